#!/usr/bin/env python3
"""Compare two sets of Kubernetes objects given as multi-document YAML.

Usage: python3 xtask/compare-manifests.py A.yaml B.yaml

Used by .github/workflows/e2e-kind.yml to check that `helm template` of
deploy/helm/tpbpf gives the same objects as `tpbpf install --dry-run -o yaml`
with the same settings. Comments, empty documents and null values are
dropped (`helm template` adds `# Source:` comments and `---` separators);
the order of documents and of mapping keys does not matter, the order of
list items does (container args, rules). Exit status: 0 same objects,
1 they differ (each difference printed), 2 a file could not be read.
"""
import json
import sys

try:
    import yaml
except ImportError:
    sys.exit("compare-manifests: PyYAML is missing (apt-get install python3-yaml, or pip install pyyaml)")


def drop_nulls(value):
    """The value without null entries, recursively."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value if v is not None]
    return value


def load(path):
    """The objects of a multi-document YAML file, nulls dropped."""
    try:
        with open(path, encoding="utf-8") as f:
            docs = list(yaml.safe_load_all(f))
    except (OSError, yaml.YAMLError) as e:
        print(f"compare-manifests: reading {path}: {e}", file=sys.stderr)
        sys.exit(2)
    objects = [drop_nulls(d) for d in docs if d is not None]
    for i, o in enumerate(objects):
        if not isinstance(o, dict):
            print(f"compare-manifests: {path}: document {i + 1} is not an object", file=sys.stderr)
            sys.exit(2)
    return objects


def canonical(o):
    return json.dumps(o, sort_keys=True, separators=(",", ":"))


def key(o):
    meta = o.get("metadata") or {}
    return (o.get("apiVersion", "?"), o.get("kind", "?"), meta.get("namespace", ""), meta.get("name", "?"))


def describe(k):
    api, kind, ns, name = k
    return f"{kind} {ns + '/' if ns else ''}{name} ({api})"


def diff(a, b, path=""):
    """Lines naming each field where a and b differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else k
            if k not in a:
                out.append(f"  {p}: only in the second: {json.dumps(b[k])}")
            elif k not in b:
                out.append(f"  {p}: only in the first: {json.dumps(a[k])}")
            else:
                out.extend(diff(a[k], b[k], p))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(diff(x, y, f"{path}[{i}]"))
        return out
    if a != b:
        return [f"  {path}: {json.dumps(a)} != {json.dumps(b)}"]
    return []


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    first, second = load(argv[1]), load(argv[2])
    if sorted(map(canonical, first)) == sorted(map(canonical, second)):
        print(f"compare-manifests: the same {len(first)} objects in {argv[1]} and {argv[2]}")
        return 0
    print(f"compare-manifests: {argv[1]} and {argv[2]} differ:")
    by_key_a = {key(o): o for o in first}
    by_key_b = {key(o): o for o in second}
    for k in sorted(set(by_key_a) | set(by_key_b)):
        if k not in by_key_b:
            print(f"{describe(k)}: only in {argv[1]}")
        elif k not in by_key_a:
            print(f"{describe(k)}: only in {argv[2]}")
        else:
            lines = diff(by_key_a[k], by_key_b[k])
            if lines:
                print(f"{describe(k)}:")
                print("\n".join(lines))
    if len(by_key_a) != len(first) or len(by_key_b) != len(second):
        print("(an object appears more than once in one of the files)")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
