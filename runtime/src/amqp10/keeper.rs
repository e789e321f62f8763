//! The keeper: the one AMQP 1.0 connection and session of a node, to the first reachable
//! intermediary of the local zone's `amqp10_brokers`.
//!
//! It takes the intermediaries from the registry (its AMQP 1.0 table) and reports every
//! failed attempt, connection and loss there. It connects to them in file order (the
//! first is the primary), publishes what
//! it has as a [`Live`] in a watch (`None` while it has nothing), and when the connection
//! ends it tries them again in order, spaced by the node's reconnect backoff. While on a
//! secondary it tries the primary every `reconnect_max` and moves back as soon as it
//! answers (the 0-9-1 side's fail-back). Every new connection gets a new generation:
//! links of an older one are dead, and their owners attach again on the new one.
//!
//! Owns: the connection, its session and the generation count. Must not touch: links
//! (the transport caches senders in [`Live`], each receiving owns its receiver).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Connection, Sender, Session};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use crate::backoff::Backoff;
use crate::log_limit::LogLimit;
use crate::registry::ConnectionRegistry;
use crate::tls::Tls;
use crate::uri::BrokerUri;

/// What the keeper needs to know, from config.ini.
#[derive(Clone)]
pub struct KeeperSettings {
    /// The container id (the node's name).
    pub node: String,
    /// Where the intermediaries are listed (the local zone's `amqp10_brokers`, primary
    /// first) and where the keeper reports each attempt, connection and loss.
    pub registry: ConnectionRegistry,
    /// `[amqp] connect_timeout_ms`: one connection attempt, session included.
    pub connect_timeout: Duration,
    /// `[amqp] heartbeat_secs`: the idle time-out asked of the peer (0: none).
    pub heartbeat: Duration,
    /// `[amqp] reconnect_min_ms` / `reconnect_max_ms`.
    pub backoff: Backoff,
    /// `[tls]`: for `amqp10s://` brokers (checked against the URI's host).
    pub tls: Option<Tls>,
}

/// A connection and its session while they are up: what links are attached on.
pub(crate) struct Live {
    /// Counts connections: links attached on another generation are dead.
    pub generation: u64,
    /// The intermediary connected to.
    pub broker: BrokerUri,
    /// The one session every link of this connection is attached on.
    pub session: tokio::sync::Mutex<SessionHandle<()>>,
    /// Sender links by address, attached on first use (the spec's sender cache).
    pub senders: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Sender>>>>,
    /// Told when a link found the session ended (RabbitMQ ends the whole session when it
    /// refuses one attach, e.g. to an exchange that does not exist).
    broken: tokio::sync::Notify,
}

impl Live {
    /// A link saw this session end: the keeper begins a new one (a new generation), on
    /// which every link attaches again.
    pub fn session_lost(&self) {
        self.broken.notify_one();
    }
}

/// Runs until `stop` turns true: keeps a connection up and publishes it in `live`.
pub(crate) async fn keep(
    settings: KeeperSettings,
    live: watch::Sender<Option<Arc<Live>>>,
    mut stop: watch::Receiver<bool>,
) {
    let failures = LogLimit::default();
    let mut generation = 0_u64;
    let mut attempt = 0_u32;
    loop {
        // Try every broker in order, the primary first.
        let mut connected = None;
        for entry in settings.registry.intermediaries() {
            if *stop.borrow() {
                return;
            }
            match connect(&settings, &entry.uri, generation + 1).await {
                Ok(up) => {
                    connected = Some((entry.index, up));
                    break;
                }
                Err(error) => {
                    settings
                        .registry
                        .intermediary_down(entry.index, &error, true);
                    let broker = entry.uri.redacted();
                    if let Some(held) = failures.allow(broker) {
                        tracing::warn!(broker, %error, held_back = held, "AMQP 1.0: cannot connect");
                    }
                }
            }
        }
        let Some((mut index, (mut connection, mut up))) = connected else {
            let delay = settings.backoff.delay(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => continue,
                _ = stop.changed() => return,
            }
        };
        attempt = 0;
        loop {
            generation = up.generation;
            tracing::info!(
                broker = up.broker.redacted(),
                generation,
                "AMQP 1.0: connected"
            );
            settings.registry.intermediary_up(index, generation);
            live.send_replace(Some(up.clone()));
            let probe = tokio::time::sleep(settings.backoff.max);
            tokio::select! {
                // The session ended under its links: a new one on the same connection.
                _ = up.broken.notified() => {
                    live.send_replace(None);
                    up.senders.lock().clear();
                    tracing::warn!(broker = up.broker.redacted(), "AMQP 1.0: the session ended; beginning a new one");
                    match begin(&mut connection, &up.broker, generation + 1, settings.connect_timeout).await {
                        Ok(next) => up = next,
                        Err(error) => {
                            tracing::warn!(broker = up.broker.redacted(), %error, "AMQP 1.0: no new session; reconnecting");
                            settings.registry.intermediary_down(index, &error, false);
                            close(&mut connection, &up, settings.connect_timeout).await;
                            break;
                        }
                    }
                }
                result = connection.on_close() => {
                    live.send_replace(None);
                    let reason = match result {
                        Ok(()) => "closed by the peer".to_string(),
                        Err(error) => error.to_string(),
                    };
                    settings.registry.intermediary_down(index, &reason, false);
                    tracing::warn!(broker = up.broker.redacted(), %reason, "AMQP 1.0: connection lost");
                    break;
                }
                _ = stop.changed() => {
                    live.send_replace(None);
                    close(&mut connection, &up, settings.connect_timeout).await;
                    settings.registry.intermediary_down(index, "the node stopped", false);
                    return;
                }
                // On a secondary: is the primary back?
                _ = probe, if index > 0 => {
                    let Some(first) = settings.registry.intermediaries().into_iter().next() else {
                        continue;
                    };
                    if let Ok((primary, primary_up)) = connect(&settings, &first.uri, generation + 1).await {
                        tracing::info!(broker = primary_up.broker.redacted(), "AMQP 1.0: the primary is back; moving to it");
                        let (mut old, old_up) = (connection, up);
                        connection = primary;
                        up = primary_up;
                        index = 0;
                        live.send_replace(Some(up.clone()));
                        close(&mut old, &old_up, settings.connect_timeout).await;
                    }
                }
            }
        }
    }
}

/// Opens a connection and its session to `broker`, within the connect bound.
async fn connect(
    settings: &KeeperSettings,
    broker: &BrokerUri,
    generation: u64,
) -> Result<(ConnectionHandle<()>, Arc<Live>), String> {
    let amqp = broker.amqp();
    // RabbitMQ picks the vhost from the open frame's hostname (`vhost:<name>`).
    let vhost = (amqp.vhost != "/").then(|| format!("vhost:{}", amqp.vhost));
    let profile = SaslProfile::Plain {
        username: amqp.authority.userinfo.username.clone(),
        password: amqp.authority.userinfo.password.clone(),
    };
    let open = async {
        let mut builder = Connection::builder()
            .container_id(settings.node.clone())
            .sasl_profile(profile)
            .hostname(vhost.as_deref());
        if !settings.heartbeat.is_zero() {
            let millis = u32::try_from(settings.heartbeat.as_millis()).unwrap_or(u32::MAX);
            builder = builder.idle_time_out(millis);
        }
        let tcp = TcpStream::connect((broker.host(), broker.port()))
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let mut connection = if broker.is_tls() {
            let Some(tls) = &settings.tls else {
                return Err("an amqp10s:// broker without TLS settings".to_string());
            };
            let name = ServerName::try_from(broker.host().to_string()).map_err(|e| {
                format!(
                    "`{}` cannot be checked against a certificate: {e}",
                    broker.host()
                )
            })?;
            let stream = TlsConnector::from(tls.client_config())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            builder.open_with_stream(stream).await
        } else {
            builder.open_with_stream(tcp).await
        }
        .map_err(|e| e.to_string())?;
        match Session::begin(&mut connection).await {
            Ok(session) => Ok((connection, session)),
            Err(error) => {
                let _ = connection.close().await;
                Err(error.to_string())
            }
        }
    };
    let (connection, session) = tokio::time::timeout(settings.connect_timeout, open)
        .await
        .map_err(|_| format!("no answer within {:?}", settings.connect_timeout))??;
    Ok((connection, live(broker, generation, session)))
}

/// A new session on `connection`, within `bound`.
async fn begin(
    connection: &mut ConnectionHandle<()>,
    broker: &BrokerUri,
    generation: u64,
    bound: Duration,
) -> Result<Arc<Live>, String> {
    let session = tokio::time::timeout(bound, Session::begin(connection))
        .await
        .map_err(|_| format!("no answer within {bound:?}"))?
        .map_err(|error| error.to_string())?;
    Ok(live(broker, generation, session))
}

fn live(broker: &BrokerUri, generation: u64, session: SessionHandle<()>) -> Arc<Live> {
    Arc::new(Live {
        generation,
        broker: broker.clone(),
        session: tokio::sync::Mutex::new(session),
        senders: parking_lot::Mutex::new(HashMap::new()),
        broken: tokio::sync::Notify::new(),
    })
}

/// Ends the session and closes the connection, each within `bound`.
async fn close(connection: &mut ConnectionHandle<()>, live: &Live, bound: Duration) {
    live.senders.lock().clear();
    let end = async {
        let mut session = live.session.lock().await;
        let _ = session.end().await;
    };
    let _ = tokio::time::timeout(bound, end).await;
    let _ = tokio::time::timeout(bound, connection.close()).await;
}
