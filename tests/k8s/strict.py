"""Strict offline validators for the k8s/ manifests and Ray Serve configs (test helpers).

* `crd_validator(crd)`: a jsonschema validator from a KubeRay CRD's served `v1` OpenAPI schema in
  which every unknown field is an error (the API server's structural pruning would drop it silently).
* `serve_config_errors(config)`: Ray's own `ServeDeploySchema`, plus the unknown keys that it ignores
  (its models keep pydantic's default `extra="ignore"`, so a misspelt option would vanish).
* Kubernetes syntax: label keys/values, DNS names and resource quantities.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any

import jsonschema
import pydantic

DNS1035_LABEL = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
_DNS1123_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
QUALIFIED_NAME = re.compile(rf"^({_DNS1123_SUBDOMAIN}/)?{_LABEL_NAME}$")
LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")
_NUMBER = r"[+-]?(\d+(\.\d*)?|\.\d+)"
QUANTITY = re.compile(rf"^(?P<num>{_NUMBER})((?P<unit>[KMGTPE]i|[numkMGTPE])|[eE](?P<exp>[+-]?\d+))?$")
_BINARY = {s: 1024 ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))}
_DECIMAL = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "64Gi", "1e3", 2) -> its value as a float."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = QUANTITY.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    unit = match["unit"] or ""
    scale = 10.0 ** int(match["exp"]) if match["exp"] else _BINARY.get(unit) or _DECIMAL.get(unit, 1.0)
    return float(match["num"]) * scale


def label_errors(labels: dict[str, str], where: str) -> list[str]:
    """Label keys must be qualified names and values label values (as KubeRay checks group labels)."""
    errors = [f"{where}: bad label key {k!r}" for k in labels if not QUALIFIED_NAME.match(str(k))]
    errors += [f"{where}: bad label value {k}={v!r}" for k, v in labels.items()
               if not isinstance(v, str) or not LABEL_VALUE.match(v)]
    return errors


# ---- CRD schemas -------------------------------------------------------------------------------


def crd_schema(crd: dict, version: str = "v1") -> dict:
    """The OpenAPI schema of the served `version` of a CustomResourceDefinition."""
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version and entry.get("served"):
            return entry["schema"]["openAPIV3Schema"]
    raise ValueError(f"CRD {crd['metadata']['name']} serves no version {version!r}")


def make_strict(schema: dict) -> dict:
    """Rewrite an OpenAPI (structural) schema in place so that jsonschema rejects unknown fields.

    An object schema with `properties` and neither `additionalProperties` nor
    `x-kubernetes-preserve-unknown-fields: true` gets `additionalProperties: false`;
    `x-kubernetes-int-or-string` accepts an integer or a string; `nullable` adds null;
    other `x-kubernetes-*` extensions and descriptions are dropped. Only schema positions are
    visited (never property names or `default` values)."""
    preserve = schema.pop("x-kubernetes-preserve-unknown-fields", False)
    if schema.pop("x-kubernetes-int-or-string", False):
        schema.pop("type", None)
        schema.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.pop("nullable", False) and isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
    for key in [k for k in schema if k.startswith("x-kubernetes-") or k == "description"]:
        del schema[key]
    if "properties" in schema and "additionalProperties" not in schema and not preserve:
        schema["additionalProperties"] = False
    for child in _subschemas(schema):
        make_strict(child)
    return schema


def _subschemas(schema: dict) -> list[dict]:
    children = list(schema.get("properties", {}).values())
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            children.append(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        children.extend(schema.get(key, []))
    return children


def metadata_schema(max_name_length: int) -> dict:
    """The part of ObjectMeta a manifest may set (the CRD leaves metadata to the API server)."""
    names = {"type": "object", "propertyNames": {"pattern": QUALIFIED_NAME.pattern},
             "additionalProperties": {"type": "string"}}
    return {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {"type": "string", "pattern": DNS1035_LABEL, "maxLength": max_name_length},
        "namespace": {"type": "string", "pattern": DNS1123_LABEL},
        "labels": {**names, "additionalProperties": {"type": "string", "pattern": LABEL_VALUE.pattern}},
        "annotations": names,
    }}


def crd_validator(crd: dict, max_name_length: int) -> jsonschema.Draft7Validator:
    """A validator for manifests of `crd`'s kind: strict schema, fixed apiVersion/kind, no status."""
    schema = make_strict(crd_schema(crd))
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    props = schema["properties"]
    props.pop("status", None)
    props["apiVersion"] = {"const": f"{group}/v1"}
    props["kind"] = {"const": kind}
    props["metadata"] = metadata_schema(max_name_length)
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator: jsonschema.Draft7Validator, manifest: dict) -> list[str]:
    """Every schema violation as '<path>: <message>' (empty when the manifest is valid)."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.path)))]


# ---- Ray Serve configs -------------------------------------------------------------------------


def serve_config_errors(config: Any) -> list[str]:
    """Errors of a Serve config: what Ray's ServeDeploySchema rejects, then every unknown key."""
    from ray.serve.schema import ServeDeploySchema  # imported here: Ray is slow to import

    try:
        ServeDeploySchema.model_validate(config)
    except pydantic.ValidationError as exc:
        return [str(exc)]
    return _unknown_keys(ServeDeploySchema, config, "")


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)


def _unknown_keys(model: Any, data: dict, path: str) -> list[str]:
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    fields.update(model.model_fields)
    errors = []
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            if model.model_config.get("extra") != "allow":
                errors.append(f"{path}{key}: unknown key for {model.__name__}")
            continue
        errors += _value_unknown_keys(field.annotation, value, f"{path}{key}.")
    return errors


def _value_unknown_keys(tp: Any, value: Any, path: str) -> list[str]:
    """Unknown keys inside `value`, read as type `tp` (models, lists, dicts and unions of them)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _value_unknown_keys(args[0], value, path)
    if origin in (typing.Union, types.UnionType):
        return _union_unknown_keys(args, value, path)
    if _is_model(tp):
        return _unknown_keys(tp, value, path) if isinstance(value, dict) else []
    if origin in (list, tuple, set, frozenset) and isinstance(value, list) and args:
        return [e for i, item in enumerate(value) for e in _value_unknown_keys(args[0], item, f"{path}{i}.")]
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return [e for k, item in value.items() for e in _value_unknown_keys(args[1], item, f"{path}{k}.")]
    return []


def _union_unknown_keys(args: tuple, value: Any, path: str) -> list[str]:
    """A dict read as Union[dict, Model] is checked as the model (Serve converts it to one later)."""
    options = [a for a in args if a is not type(None)]
    if isinstance(value, dict) and any(_is_model(a) for a in options):
        options = [a for a in options if _is_model(a)]
    results = [_value_unknown_keys(a, value, path) for a in options]
    return min(results, key=len) if results else []
