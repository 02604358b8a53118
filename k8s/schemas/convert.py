"""Turns a CustomResourceDefinition into the JSON schema that tests/test_manifests.py validates
custom resources against: the openAPIV3Schema of one version, with what the API server would
drop made an error.

    python k8s/schemas/convert.py CRD.yaml VERSION OUT.json

An object schema that does not preserve unknown fields gets additionalProperties: false, as the
API server prunes (silently drops) fields its schema does not name. Descriptions go (they are
most of a CRD's size); int-or-string, nullable and embedded resources become plain JSON schema.
The top-level metadata, which a CRD leaves open, gets the usual ObjectMeta fields only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}


def convert(node: dict) -> dict:
    out: dict = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: convert(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = convert(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [convert(sub) for sub in value]
        elif key == "description" or key.startswith("x-kubernetes-") or key == "nullable":
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    elif (
        out.get("type") == "object"
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def crd_schema(crd: dict, version: str) -> dict:
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = convert(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return {"$schema": "http://json-schema.org/draft-07/schema#", **schema}


def main(crd_path: str, version: str, out: str) -> None:
    (crd,) = [d for d in yaml.safe_load_all(Path(crd_path).read_text()) if d]
    text = json.dumps(crd_schema(crd, version), separators=(",", ":"), sort_keys=True)
    Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
