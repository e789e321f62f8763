use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, PoisonError};

use crate::SupportError;

/// Ports the machine's own RabbitMQ setup may use: epmd, the system node's AMQP,
/// distribution and management/prometheus ports, and the range rabbitmqctl binds for its
/// own distribution listener (RABBITMQ_CTL_DIST_PORT_MIN..MIN+10). The kernel hands these
/// out from the ephemeral range too, so we skip them to avoid racing a short-lived
/// rabbitmqctl.
fn is_reserved(port: u16) -> bool {
    matches!(port, 4369 | 5672 | 15672 | 15692 | 25672 | 35672..=35682)
}

/// Ports this process already handed out, so two nodes started in parallel never get the
/// same port between "bind :0, close" and the node binding it.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Returns a currently free TCP port on 127.0.0.1 that this process has not handed out
/// before. Exists so test nodes (and tests that need a port nobody listens on) never clash
/// with each other or the shared broker.
pub fn try_free_port() -> Result<u16, SupportError> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    for _ in 0..200 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| SupportError::io("bind 127.0.0.1:0", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| SupportError::io("local_addr of 127.0.0.1:0 listener", e))?
            .port();
        if !is_reserved(port) && handed_out.insert(port) {
            return Ok(port);
        }
    }
    Err(SupportError::InvalidState(
        "no free TCP port found on 127.0.0.1 after 200 attempts".into(),
    ))
}

/// Infallible [`try_free_port`] for test code.
///
/// # Panics
/// If the OS cannot give us a port at all (nothing a test could recover from).
pub fn free_port() -> u16 {
    match try_free_port() {
        Ok(port) => port,
        Err(e) => panic!("free_port: {e}"),
    }
}
