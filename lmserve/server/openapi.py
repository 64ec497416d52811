"""The server's OpenAPI document, corrected to what it really answers.

FastAPI documents a 422 body for every route and JSON for every answer; the server answers a bad
request with 400 and an OpenAI error body, streams text/event-stream, and serves /metrics as
Prometheus text. `openapi(app)` rewrites the generated schema accordingly (and marks optional
request fields as nullable, since null means "the default")."""

from __future__ import annotations

from fastapi import FastAPI

from lmserve.server import protocol as proto


_STRING_OR_NULL = [{"type": "string"}, {"type": "null"}]
_ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "title": "ErrorResponse",
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"anyOf": _STRING_OR_NULL},
        "code": {"anyOf": [*_STRING_OR_NULL, {"type": "integer"}]}}}},
}
_ERRORS = {400: "Invalid JSON, parameter or text (the OpenAI error body names the parameter)",
           401: "Missing or incorrect API key (when the server has one)",
           404: "No such model", 413: "Request body over the size limit",
           429: "Too many requests waiting (Retry-After says when to try again)",
           500: "Unexpected server error", 503: "The engine is not running",
           504: "The request ran over the server's time limit"}
_ANY_OBJECT = {"type": "object"}
_MODEL_CARD = {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
    "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
    "owned_by": {"type": "string"}, "max_model_len": {"type": "integer"},
    "parent": {"type": "string"}, "root": {"type": "string"}}}  # parent, root: LoRA adapters
_LORA_ADAPTER = {"type": "object", "required": ["object", "lora_name", "status"], "properties": {
    "object": {"const": "lora_adapter"}, "lora_name": {"type": "string"}, "lora_path": {"type": "string"},
    "status": {"enum": ["loaded", "unloaded"]}}}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _event_stream(chunk: dict) -> dict:
    """Server-sent events: each one's data a chunk or an error body (JSON), the last `[DONE]`."""
    payload = {"type": "string", "contentMediaType": "application/json",
               "contentSchema": {"anyOf": [chunk, {"$ref": "#/components/schemas/ErrorResponse"}]}}
    return {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {
        "data": {"if": {"const": "[DONE]"}, "else": payload}}}}}


def _model_schema(model) -> dict:
    """A response model's JSON schema, its own definitions under "$defs" (moved to the components by
    `openapi`), the model itself by reference."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    defs = schema.pop("$defs", {})
    return {"$ref": f"#/components/schemas/{model.__name__}", "$defs": {**defs, model.__name__: schema}}


def _route_docs() -> dict[tuple[str, str], tuple[dict, tuple[int, ...]]]:
    """(method, path) -> (the 200 answer's content, the error statuses the route can answer)."""
    ref = "#/components/schemas/{model}"
    generating = (400, 401, 404, 413, 429, 500, 503, 504)
    return {
        ("post", "/v1/completions"): ({**_json(_model_schema(proto.CompletionResponse)),
                                       **_event_stream({"$ref": ref.format(model="CompletionResponse")})},
                                      generating),
        ("post", "/v1/chat/completions"): ({**_json(_model_schema(proto.ChatCompletionResponse)),
                                            **_event_stream(_model_schema(proto.ChatCompletionChunk))}, generating),
        ("get", "/v1/models"): (_json({"type": "object", "required": ["object", "data"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": _MODEL_CARD}}}), (401, 500)),
        ("get", "/v1/models/{model_id}"): (_json(_MODEL_CARD), (401, 404, 500)),
        ("get", "/health"): (_json({"type": "object", "required": ["status"], "properties": {
            "status": {"const": "ok"}}}), (503,)),
        ("get", "/metrics"): ({"text/plain": {"schema": {"type": "string"}}}, (401, 500)),
        ("post", "/tokenize"): (_json({"type": "object", "required": ["tokens", "count", "max_model_len"],
                                       "properties": {"tokens": {"type": "array", "items": {"type": "integer"}},
                                                      "count": {"type": "integer"},
                                                      "max_model_len": {"type": "integer"}}}),
                                (400, 401, 404, 413, 500)),
        ("post", "/detokenize"): (_json({"type": "object", "required": ["prompt"], "properties": {
            "prompt": {"type": "string"}}}), (400, 401, 404, 413, 500)),
        ("get", "/tokenizer_info"): (_json(_ANY_OBJECT), (400, 401, 500)),
        ("get", "/v1/engine/status"): (_json(_ANY_OBJECT), (400, 401, 500)),
        ("post", "/v1/load_lora_adapter"): (_json(_LORA_ADAPTER), (400, 401, 413, 500, 503)),
        ("post", "/v1/unload_lora_adapter"): (_json(_LORA_ADAPTER), (400, 401, 404, 413, 500, 503)),
    }


def _nullable_optionals(schema: dict, names: set[str]) -> None:
    """Request models take null for an optional field as its default (protocol._Request): say so."""
    for name in names:
        model = schema.get(name, {})
        required = set(model.get("required", ()))
        for field, spec in model.get("properties", {}).items():
            kinds = spec.get("anyOf", [spec])
            if field not in required and not any(kind.get("type") == "null" for kind in kinds):
                model["properties"][field] = {"anyOf": [spec, {"type": "null"}], **(
                    {"default": spec["default"]} if "default" in spec else {})}


def _request_models(components: dict, roots: list[str]) -> set[str]:
    """The component schemas reachable from `roots`, the request bodies'."""
    found, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in found or name not in components:
            continue
        found.add(name)
        todo.extend(ref.rsplit("/", 1)[-1] for ref in _refs(components[name]))
    return found


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if isinstance(node.get("$ref"), str) else []) + [
            ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _pop_defs(node) -> dict:
    """Every "$defs" inside `node`, taken out."""
    found = {}
    if isinstance(node, dict):
        found |= node.pop("$defs", {})
        for value in node.values():
            found |= _pop_defs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _pop_defs(value)
    return found


def openapi(app: FastAPI) -> dict:
    """FastAPI's OpenAPI schema, corrected: no 422, the error statuses each route answers with the
    OpenAI error body, the 200 answers' real bodies and content types (JSON or an event stream,
    Prometheus text for /metrics), and null accepted for optional request fields."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = FastAPI.openapi(app)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    components["ErrorResponse"] = _ERROR_SCHEMA
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    bodies = []
    for (method, path), (content, statuses) in _route_docs().items():
        operation = schema.get("paths", {}).get(path, {}).get(method)
        if operation is None:
            continue
        bodies += [ref.rsplit("/", 1)[-1] for ref in _refs(operation.get("requestBody", {}))]
        for name, definition in _pop_defs(content).items():
            components.setdefault(name, definition)
        operation["responses"] = {"200": {"description": "Successful Response", "content": content}} | {
            str(status): {"description": _ERRORS[status], "content": _json(error)} for status in statuses}
    _nullable_optionals(components, _request_models(components, bodies))
    return schema
