#!/usr/bin/env python3
"""A scripted session against a running chat server: register two users, send a message,
deliver it, read it, and print the receipt timeline.

    python3 -m venv /tmp/chat-venv && /tmp/chat-venv/bin/pip install websockets
    /tmp/chat-venv/bin/python scripts/try_it.py [http://127.0.0.1:8080]
"""
import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
import uuid

import websockets

BASE = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"


def http(method, path, body=None, token=None):
    req = urllib.request.Request(BASE + path, method=method)
    if body is not None:
        req.data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def account(name):
    status, body = http("POST", "/v1/accounts", {"username": name, "password": "correct horse battery"})
    assert status == 201, body
    status, session = http("POST", "/v1/sessions", {"username": name, "password": "correct horse battery"})
    assert status == 200, session
    print(f"registered {name}: {body['user_id']}")
    return session


async def frame(ws, want):
    """Reads frames until one of type `want` arrives (prints every frame)."""
    while True:
        f = json.loads(await asyncio.wait_for(ws.recv(), 10))
        print(f"  <- {f}")
        if f["type"] == want:
            return f


async def main():
    tag = uuid.uuid4().hex[:6]
    alice, bob = account(f"alice{tag}"), account(f"bob{tag}")
    ws_url = BASE.replace("http", "ws", 1) + "/v1/ws?access_token="
    async with websockets.connect(ws_url + alice["token"]) as a, websockets.connect(ws_url + bob["token"]) as b:
        await frame(a, "welcome")
        await frame(b, "welcome")
        send = {"type": "send", "ref": 1, "client_msg_id": "hello-1", "to": bob["user_id"], "body": "hi bob!"}
        print(f"alice -> {send}")
        await a.send(json.dumps(send))
        sent = await frame(a, "sent")
        msg = await frame(b, "message")
        delivered = {"type": "delivered", "ref": 2, "conversation_id": msg["conversation_id"], "message_ids": [msg["message_id"]]}
        print(f"bob -> {delivered}")
        await b.send(json.dumps(delivered))
        await frame(a, "receipt")
        read = {"type": "read", "ref": 3, "conversation_id": msg["conversation_id"], "up_to": msg["message_id"]}
        print(f"bob -> {read}")
        await b.send(json.dumps(read))
        await frame(a, "receipt")
    # The receipt timeline is a projection: poll until all three transitions are in.
    for _ in range(50):
        status, body = http("GET", f"/v1/messages/{sent['message_id']}/receipts", token=alice["token"])
        if status == 200 and len(body["receipts"]) == 3:
            break
        time.sleep(0.2)
    print("receipt timeline:")
    for r in body["receipts"]:
        print(f"  {r['status']:<9} {r['at']}  device={r['device_id'] or '-'}")
    assert [r["status"] for r in body["receipts"]] == ["sent", "delivered", "seen"], body


asyncio.run(main())
