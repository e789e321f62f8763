//! Bootstrap: adds every broker of every zone and blocks the node's start until a broker
//! of the local zone is available, like Kazoo's `kz_amqp_bootstrap`.
//!
//! It is a temporary child of the root supervisor. Its `pre_start` only waits on the
//! registry (the connection actors do the broker I/O), so the root supervisor's start, and
//! with it `warren run`, blocks until the node can talk to a broker. After
//! `startup_timeout` with no local broker it fails, and its error names every broker tried
//! with its last error. Once done it stops itself; a restarted connections supervisor
//! rebuilds its children from the registry, so bootstrap never needs to run again.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::connections::Connections;

/// Arguments of the bootstrap actor.
pub struct BootstrapArgs {
    pub connections: Connections,
    pub startup_timeout: Duration,
}

/// The actor that brings the node's brokers up at start.
pub struct Bootstrap;

impl Actor for Bootstrap {
    type Msg = ();
    type State = ();
    type Arguments = BootstrapArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: BootstrapArgs,
    ) -> Result<(), ActorProcessingErr> {
        let registry = args.connections.registry().clone();
        for broker in registry.brokers() {
            args.connections.add_broker(broker.id).await?;
        }
        tracing::info!(
            brokers = registry.brokers().len(),
            zone = registry.local_zone(),
            "waiting for a local broker"
        );
        let primary = registry.wait_until_ready(args.startup_timeout).await?;
        tracing::info!(primary = %primary, "local broker ready");
        Ok(())
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        _state: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        myself.stop(Some("bootstrap done".to_string()));
        Ok(())
    }
}
