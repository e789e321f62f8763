#!/usr/bin/python3
"""An RPC peer of warren's targets written only from README.md, "RPC targets and
notifications" (the address table, the RabbitMQ mapping and the wire format), with pika:
no warren code. tests/interop.rs runs it as a subprocess to prove that a client that
knows only the documented format can call, cast and fan out to warren's RPC servers.

Modes (stdout: one JSON object per line; errors on stderr):

  call    --topic T [--server S] --method M [--args JSON] [--count N] [--timeout SECS]
          A call to the named server S (address exclusive.T.S) or to one of the group
          (unicast.T), N times in turn, each waiting for its reply. Prints
          {"id": <request id>, "reply": <reply body>} per call (a Failure reply is a
          reply: exit 0).
  cast    --topic T [--server S] --method M [--args JSON]: no reply asked for.
  fanout  --topic T --method M [--args JSON]: a cast to every server of T
          (exchange /broadcast/T). Casts print {"published": <request id>}.

Every request is published mandatory on a channel with publisher confirms.
Exit codes: 0 done; 1 anything else (connection, channel error); 2 usage;
3 the request was returned (no queue bound for it); 4 nacked; 5 no reply within the
timeout; 6 a reply that does not read as documented; 7 a second reply to one request.
"""

import argparse
import json
import sys
import time
import uuid

import pika
import pika.exceptions

RETURNED, NACKED, TIMEOUT, BAD_REPLY, DUPLICATE = 3, 4, 5, 6, 7


class PeerError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def address(args):
    """(exchange, exchange kind, routing key) of the target, from the address table."""
    if args.mode == "fanout":
        broadcast = "/broadcast/%s" % args.topic
        return broadcast, "fanout", broadcast
    if args.server:
        return args.exchange, "topic", "exclusive.%s.%s" % (args.topic, args.server)
    return args.exchange, "topic", "unicast.%s" % args.topic


def publish(channel, exchange, routing_key, body, properties):
    try:
        channel.basic_publish(
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            properties=properties,
            mandatory=True,
        )
    except pika.exceptions.UnroutableError:
        raise PeerError(RETURNED, "returned: no queue is bound for %s on %r"
                        % (routing_key, exchange))
    except pika.exceptions.NackError:
        raise PeerError(NACKED, "the broker nacked the request to %s" % routing_key)


def request(method, args, msg_id):
    return json.dumps({
        "Event-Category": "rpc",
        "Event-Name": method,
        "Msg-ID": msg_id,
        "Args": args,
    }).encode("utf-8")


class Replies:
    """The caller's own exclusive queue and the replies that came to it, by correlation id."""

    def __init__(self, channel):
        self.channel = channel
        declared = channel.queue_declare(queue="", exclusive=True, auto_delete=True)
        self.queue = declared.method.queue
        self.waiting = set()
        self.answered = set()
        self.got = {}
        channel.basic_consume(self.queue, self.on_reply, auto_ack=True)

    def on_reply(self, _channel, _method, properties, body):
        correlation = properties.correlation_id
        if correlation in self.answered or correlation in self.got:
            raise PeerError(DUPLICATE, "a second reply to request %s" % correlation)
        if correlation not in self.waiting:
            print("dropped a reply to a request not waited for: %r" % correlation,
                  file=sys.stderr)
            return
        self.got[correlation] = (properties, body)

    def wait(self, connection, msg_id, timeout):
        deadline = time.monotonic() + timeout
        while msg_id not in self.got:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerError(TIMEOUT, "no reply to %s within %.1f s" % (msg_id, timeout))
            connection.process_data_events(time_limit=min(left, 0.05))
        self.waiting.discard(msg_id)
        self.answered.add(msg_id)
        return self.got.pop(msg_id)


def check_reply(msg_id, properties, body):
    """The reply body, checked against the documented format."""
    if properties.content_type != "application/json":
        raise PeerError(BAD_REPLY, "reply content_type %r" % properties.content_type)
    try:
        reply = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise PeerError(BAD_REPLY, "reply is not UTF-8 JSON: %s" % error)
    if not isinstance(reply, dict):
        raise PeerError(BAD_REPLY, "reply is not a JSON object")
    if reply.get("Event-Category") != "rpc" or reply.get("Event-Name") != "reply":
        raise PeerError(BAD_REPLY, "reply envelope %r/%r"
                        % (reply.get("Event-Category"), reply.get("Event-Name")))
    if reply.get("Msg-ID") not in (None, msg_id):
        raise PeerError(BAD_REPLY, "reply Msg-ID %r for request %s"
                        % (reply.get("Msg-ID"), msg_id))
    if ("Result" in reply) == ("Failure" in reply):
        raise PeerError(BAD_REPLY, "a reply needs exactly one of Result and Failure")
    failure = reply.get("Failure")
    if failure is not None and not (isinstance(failure, dict)
                                    and isinstance(failure.get("type"), str)):
        raise PeerError(BAD_REPLY, "a Failure without a type: %r" % failure)
    return reply


def run(args):
    try:
        call_args = json.loads(args.args)
    except ValueError as error:
        raise PeerError(2, "--args is not JSON: %s" % error)
    parameters = pika.URLParameters(args.uri)
    parameters.socket_timeout = 5
    parameters.stack_timeout = 10
    parameters.blocked_connection_timeout = args.timeout
    connection = pika.BlockingConnection(parameters)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        exchange, kind, routing_key = address(args)
        # Declared as the RabbitMQ mapping says the servers declare it (406 if not).
        channel.exchange_declare(exchange=exchange, exchange_type=kind, durable=True)
        if args.mode != "call":
            msg_id = uuid.uuid4().hex
            properties = pika.BasicProperties(
                content_type="application/json", message_id=msg_id)
            publish(channel, exchange, routing_key,
                    request(args.method, call_args, msg_id), properties)
            print(json.dumps({"published": msg_id}), flush=True)
            return
        replies = Replies(channel)
        for _ in range(args.count):
            msg_id = uuid.uuid4().hex
            properties = pika.BasicProperties(
                content_type="application/json",
                message_id=msg_id,
                reply_to=replies.queue,
                expiration=str(int(args.timeout * 1000)),
            )
            replies.waiting.add(msg_id)
            publish(channel, exchange, routing_key,
                    request(args.method, call_args, msg_id), properties)
            reply_properties, body = replies.wait(connection, msg_id, args.timeout)
            reply = check_reply(msg_id, reply_properties, body)
            print(json.dumps({"id": msg_id, "reply": reply}), flush=True)
    finally:
        if connection.is_open:
            connection.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["call", "cast", "fanout"])
    parser.add_argument("--uri", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    parser.add_argument("--exchange", default="openstack", help="[rpc] exchange")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--server", help="the named server (address A)")
    parser.add_argument("--method", required=True)
    parser.add_argument("--args", default="{}", help="a JSON object")
    parser.add_argument("--count", type=int, default=1, help="calls, one after the other")
    parser.add_argument("--timeout", type=float, default=5.0, help="per call, seconds")
    args = parser.parse_args()
    try:
        run(args)
    except PeerError as error:
        print("oslo_peer: %s" % error, file=sys.stderr)
        sys.exit(error.code)
    except pika.exceptions.AMQPError as error:
        print("oslo_peer: AMQP error: %r" % (error,), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
