//! A plain lapin client for tests: publishes requests and raw bodies, and receives replies
//! on its own queue bound to `targeted` (routing key = its queue name), the way any kapi
//! client would talk to warren.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind, PublisherConfirm,
};
use warren_runtime::envelope::{Envelope, publish_properties};

/// A test's own AMQP client.
pub struct Client {
    pub connection: Connection,
    pub channel: Channel,
    /// The client's reply queue (its Server-ID).
    pub queue: String,
    replies: Consumer,
}

impl Client {
    pub async fn connect(uri: &str, name: &str) -> Client {
        let connection = Connection::connect(
            uri,
            ConnectionProperties::default().with_connection_name(format!("{name}/client").into()),
        )
        .await
        .expect("test client connects");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        // As warren declares it by default: durable.
        channel
            .exchange_declare(
                "targeted".into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("targeted exchange (durable, as warren declares it)");
        let queue = format!("{name}-replies");
        let replies = reply_queue(&channel, &queue, false).await;
        Client {
            connection,
            channel,
            queue,
            replies,
        }
    }

    /// Declares an exchange as warren listeners declare theirs (transient).
    pub async fn declare_exchange(&self, name: &str, kind: ExchangeKind) {
        self.channel
            .exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declare exchange");
    }

    /// Publishes an envelope (confirmed), persistent.
    pub async fn publish(&self, exchange: &str, routing_key: &str, envelope: &Envelope) {
        self.publish_raw(
            exchange,
            routing_key,
            &envelope.encode(),
            publish_properties(false).with_delivery_mode(2),
        )
        .await;
    }

    /// Publishes any body (confirmed: a nack fails the test).
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish");
        expect_ack(confirm).await;
    }

    /// A request carrying this client's queue as Server-ID.
    pub fn request(&self, category: &str, name: &str) -> Envelope {
        let mut request = Envelope::new(category, name).with("Server-ID", self.queue.as_str());
        request.ensure_msg_id();
        request
    }

    /// The next reply, if one arrives in time.
    pub async fn reply(&mut self, timeout: Duration) -> Option<Envelope> {
        let delivery = tokio::time::timeout(timeout, self.replies.next())
            .await
            .ok()??
            .ok()?;
        Envelope::decode(&delivery.data, None, None).ok()
    }

    /// Declares a durable named queue (and returns its ready message count).
    pub async fn queue(&self, name: &str, arguments: FieldTable) -> u32 {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .expect("declare queue")
            .message_count()
    }

    /// Ready messages in a queue.
    pub async fn ready(&self, name: &str) -> u32 {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare")
            .message_count()
    }

    /// Takes every message from a queue (acked), as (body, decoded envelope if any).
    pub async fn drain(&self, name: &str) -> Vec<(Vec<u8>, Option<Envelope>)> {
        let mut out = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(name.into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
        {
            let delivery = message.delivery;
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
            let envelope = Envelope::decode(&delivery.data, None, None).ok();
            out.push((delivery.data, envelope));
        }
        out
    }

    pub async fn delete_queue(&self, name: &str) {
        let _ = self
            .channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await;
    }
}

/// Waits for a publisher confirm and fails the test unless the broker acked the message:
/// a nack (or a channel without confirms) is a lost message, not a success.
pub async fn expect_ack(confirm: PublisherConfirm) {
    match confirm.await {
        Ok(Confirmation::Ack(_)) => {}
        Ok(Confirmation::Nack(_)) => panic!("the broker nacked a publish"),
        Ok(Confirmation::NotRequested) => panic!("publish on a channel without confirms"),
        Err(error) => panic!("no confirm: {error}"),
    }
}

/// One request/reply the way a process without a pool does it: its own channel and reply
/// queue, opened for this call and closed after it. Sends ("rpc", "echo") with `Payload` =
/// `n` to `exchange` with routing key `rpc.echo` and checks the reply.
pub async fn one_shot_call(connection: &Connection, exchange: &str, n: usize) {
    let channel = connection.create_channel().await.expect("channel");
    let queue = format!("one-shot-{}", warren_runtime::envelope::new_msg_id());
    let mut replies = reply_queue(&channel, &queue, true).await;
    let mut request = Envelope::new("rpc", "echo")
        .with("Payload", n)
        .with("Server-ID", queue.as_str());
    request.ensure_msg_id();
    channel
        .basic_publish(
            exchange.into(),
            "rpc.echo".into(),
            BasicPublishOptions::default(),
            &request.encode(),
            publish_properties(false),
        )
        .await
        .expect("publish");
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("a reply in time")
        .expect("stream open")
        .expect("delivery");
    let reply = Envelope::decode(&reply.data, None, None).expect("reply envelope");
    assert_eq!(reply.get("Payload"), Some(&serde_json::json!(n)));
    let _ = channel.close(200, "done".into()).await;
}

/// Declares a reply queue (auto-deleted), binds it to `targeted` with its own name, and
/// consumes it without acks.
pub async fn reply_queue(channel: &Channel, queue: &str, exclusive: bool) -> Consumer {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("reply queue");
    channel
        .queue_bind(
            queue.into(),
            "targeted".into(),
            queue.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the reply queue");
    channel
        .basic_consume(
            queue.into(),
            "replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume replies")
}
