#!/usr/bin/python3
"""An AMQP 1.0 RPC peer of warren's targets written only from README.md, "AMQP 1.0"
(the address table for RabbitMQ 3.x) and "RPC targets and notifications" (the wire
format), with Qpid Proton: no warren code. tests/amqp10.rs runs it as a subprocess to
prove that a peer that knows only the documented format can call warren's RPC servers
over AMQP 1.0, and serve calls from warren's clients.

Modes (stdout: one JSON object per line; errors on stderr):

  call   --url U --address A --method M [--args JSON] [--count N] [--timeout SECS]
         N requests to address A (e.g. /queue/unicast.T), pre-settled, each with a
         message-id, reply-to = this peer's reply address and a TTL of the timeout, each
         waiting for the reply whose correlation-id is that id. Prints
         {"id": <request id>, "reply": <reply body>} per call.
  cast   --url U --address A --method M [--args JSON]: no reply asked for. Prints
         {"sent": <request id>}.
  serve  --url U --address A [--count N] [--timeout SECS]: takes N requests from
         address A; a request for method "echo" is answered with its Args as Result,
         any other with a Failure of type "UnknownMethod". Prints {"served": <method>}
         per request, and {"ready": true} once its link is attached.

Exit codes: 0 done; 1 anything else; 2 usage; 5 nothing within the timeout; 6 a reply or
request that does not read as documented.
"""

import argparse
import json
import os
import sys
import uuid

from proton import Message
from proton.utils import BlockingConnection

TIMEOUT, BAD = 5, 6


def out(obj):
    print(json.dumps(obj), flush=True)


def connect(args):
    return BlockingConnection(args.url, timeout=args.timeout, allowed_mechs="PLAIN")


def body_of(message):
    """The JSON object a message carries: one data section, or a string or binary value."""
    body = message.body
    if isinstance(body, (bytes, bytearray, memoryview)):
        body = bytes(body).decode("utf-8")
    try:
        value = json.loads(body)
    except (TypeError, ValueError) as error:
        raise SystemExit(("%s" % error, BAD))
    if not isinstance(value, dict):
        raise SystemExit(("not a JSON object", BAD))
    return value


def request(method, args):
    msg_id = str(uuid.uuid4())
    envelope = {
        "Event-Category": "rpc",
        "Event-Name": method,
        "Msg-ID": msg_id,
        "Args": args,
    }
    return msg_id, json.dumps(envelope).encode("utf-8")


def call(args, cast=False):
    conn = connect(args)
    reply_address = "/queue/reply.amqp10-peer-%d" % os.getpid()
    receiver = None if cast else conn.create_receiver(reply_address, credit=10)
    sender = conn.create_sender(args.address)
    for _ in range(args.count):
        msg_id, body = request(args.method, json.loads(args.args))
        message = Message(body=body, inferred=True, id=msg_id, address=args.address,
                          content_type="application/json", ttl=args.timeout)
        if not cast:
            message.reply_to = reply_address
        sender.send(message)
        if cast:
            out({"sent": msg_id})
            continue
        try:
            reply = receiver.receive(timeout=args.timeout)
        except Exception as error:  # proton raises Timeout
            print("no reply: %s" % error, file=sys.stderr)
            sys.exit(TIMEOUT)
        receiver.accept()
        if reply.correlation_id != msg_id:
            print("reply to %r, not %r" % (reply.correlation_id, msg_id), file=sys.stderr)
            sys.exit(BAD)
        out({"id": msg_id, "reply": body_of(reply)})
    conn.close()


def serve(args):
    conn = connect(args)
    receiver = conn.create_receiver(args.address, credit=10)
    senders = {}
    out({"ready": True})
    for _ in range(args.count):
        try:
            message = receiver.receive(timeout=args.timeout)
        except Exception as error:
            print("no request: %s" % error, file=sys.stderr)
            sys.exit(TIMEOUT)
        receiver.accept()
        envelope = body_of(message)
        method = envelope.get("Event-Name")
        msg_id = message.id or envelope.get("Msg-ID")
        reply = {"Event-Category": "rpc", "Event-Name": "reply", "Msg-ID": msg_id}
        if method == "echo":
            reply["Result"] = envelope.get("Args", {})
        else:
            reply["Failure"] = {"type": "UnknownMethod", "message": "no method %s" % method}
        if message.reply_to:
            sender = senders.get(message.reply_to)
            if sender is None:
                sender = senders[message.reply_to] = conn.create_sender(message.reply_to)
            sender.send(Message(body=json.dumps(reply).encode("utf-8"), inferred=True,
                                correlation_id=msg_id, address=message.reply_to,
                                content_type="application/json"))
        out({"served": method})
    conn.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["call", "cast", "serve"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--method", default="echo")
    parser.add_argument("--args", default="{}")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    try:
        if args.mode == "serve":
            serve(args)
        else:
            call(args, cast=args.mode == "cast")
    except SystemExit as exit:
        if isinstance(exit.code, tuple):
            print(exit.code[0], file=sys.stderr)
            sys.exit(exit.code[1])
        raise
    except Exception as error:
        print("%s: %s" % (type(error).__name__, error), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
