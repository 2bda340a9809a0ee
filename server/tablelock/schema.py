"""The machine-readable protocol: an AsyncAPI 3 document built from the wire types.

    python -m tablelock.schema > docs/asyncapi.json

The JSON schemas come from the same msgspec structs the gateway decodes and
encodes with, so a vendor writing a client in another language validates
against exactly what the broker speaks. tests/test_schema.py fails when the
committed document and the code drift apart.
"""

from __future__ import annotations

import json
import typing
from typing import Any

import msgspec

from . import __version__
from .prompts import PROMPTS
from .protocol import (
    CLOSE_CODES,
    EVENT_NAMES,
    RELEASE_REASONS,
    RESULT_OF_REQUEST,
    ClientMessage,
    ErrorReply,
    EventFrame,
    Request,
    RpcCall,
    RpcResult,
)

REF = "#/components/schemas/"


def request_types() -> list[type[Request]]:
    return [t for t in typing.get_args(ClientMessage) if issubclass(t, Request)]


def build() -> dict[str, Any]:
    requests = request_types()
    results = {name: t for name, t in RESULT_OF_REQUEST.items() if t is not msgspec.Struct}
    types: list[Any] = [*requests, *results.values(), RpcResult, RpcCall, EventFrame,
                        ErrorReply]
    (_, *_), components = msgspec.json.schema_components(types, ref_template=REF + "{name}")
    # `missed` holds raw event frames, typed in code as msgspec.Raw.
    subscribe = components["SubscribeResult"]["properties"]["missed"]
    subscribe["anyOf"] = [{"type": "array", "items": {"$ref": REF + "EventFrame"}},
                          {"type": "null"}]
    subscribe.pop("type", None)
    subscribe.pop("items", None)
    _add_enumerations(components)

    messages: dict[str, Any] = {}
    for req in requests:
        tag = req.__struct_config__.tag
        assert isinstance(tag, str)
        messages[_msg_name(tag, "request")] = {
            "name": tag, "title": f"{tag} request", "payload": {"$ref": REF + req.__name__}}
        result = RESULT_OF_REQUEST.get(tag)
        reply: dict[str, Any] = {
            "allOf": [{"type": "object", "properties": {"id": {}, "ok": {"const": True}},
                       "required": ["id", "ok"]}]}
        if result is not None and result is not msgspec.Struct:
            reply["allOf"].append({"$ref": REF + result.__name__})
        messages[_msg_name(tag, "reply")] = {
            "name": f"{tag} reply", "title": f"{tag} reply (ok)", "payload": reply}
    messages["error"] = {"name": "error", "title": "any refused request",
                         "payload": {"$ref": REF + "ErrorReply"}}
    messages["event"] = {"name": "event", "title": "a channel event or a direct event",
                         "payload": {"$ref": REF + "EventFrame"}}
    messages["rpc"] = {"name": "rpc", "title": "server-to-ERP call (order.fetch)",
                       "payload": {"$ref": REF + "RpcCall"}}
    messages["rpc_result"] = {"name": "rpc.result", "title": "the ERP's answer to an rpc",
                              "payload": {"$ref": REF + "RpcResult"}}
    to_server = [k for k in messages if k.endswith("_request")] + ["rpc_result"]
    to_client = [k for k in messages if k not in to_server]
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "tablelock protocol",
            "version": f"1 (broker {__version__})",
            "description": "WebSocket protocol of the tablelock order-lock broker. "
                           "See docs/protocol.md for the semantics.",
        },
        "servers": {"broker": {"host": "localhost:8080", "protocol": "ws",
                               "pathname": "/ws",
                               "description": "Subprotocol tablelock.v1; UTF-8 JSON text frames."}},
        "channels": {"ws": {"address": "/ws", "messages": {
            k: {"$ref": f"#/components/messages/{k}"} for k in messages}}},
        "operations": {
            "clientSends": {"action": "receive", "channel": {"$ref": "#/channels/ws"},
                            "messages": [{"$ref": f"#/channels/ws/messages/{k}"}
                                         for k in to_server]},
            "serverSends": {"action": "send", "channel": {"$ref": "#/channels/ws"},
                            "messages": [{"$ref": f"#/channels/ws/messages/{k}"}
                                         for k in to_client]},
        },
        "components": {"messages": messages, "schemas": components},
    }


def _add_enumerations(components: dict[str, Any]) -> None:
    """Name the closed sets the wire types hold as plain strings: event names, release
    reasons, error codes; and the close codes, which no frame carries."""
    error_codes = list(dict.fromkeys(code for code, _ in PROMPTS))
    components["EventName"] = {"type": "string", "enum": list(EVENT_NAMES)}
    components["ReleaseReason"] = {
        "type": "string", "enum": list(RELEASE_REASONS),
        "description": "why a lock.released event ended the lock"}
    components["ErrorCode"] = {"type": "string", "enum": error_codes}
    components["CloseCode"] = {
        "type": "integer", "description": "WebSocket close codes the broker sends",
        "oneOf": [{"const": int(code), "description": text}
                  for code, text in sorted(CLOSE_CODES.items())]}
    event = components["EventFrame"]["properties"]
    event["event"] = {"$ref": REF + "EventName"}
    event["reason"] = {"anyOf": [{"$ref": REF + "ReleaseReason"}, {"type": "null"}],
                       "default": None}
    components["ErrorBody"]["properties"]["code"] = {"$ref": REF + "ErrorCode"}
    components["CheckResult"]["properties"]["code"] = {
        "anyOf": [{"$ref": REF + "ErrorCode"}, {"type": "null"}], "default": None}


def _msg_name(tag: str, suffix: str) -> str:
    return f"{tag.replace('.', '_')}_{suffix}"


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False, sort_keys=False) + "\n"


if __name__ == "__main__":
    print(render(), end="")
