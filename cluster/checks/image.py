"""The project's checks of the container image: what ``cluster/docker/Dockerfile`` builds and who runs in it.

:func:`parse_dockerfile` reads the Dockerfile; :func:`dockerfile_pin_errors`: its pins are pyproject.toml's;
:func:`image_errors`: every config names the image it documents; :func:`setup_path_errors`: the launcher's
commands write only where their user (the image's, or the host's) may.
"""

from __future__ import annotations

import re
import shlex
from typing import Any


def parse_dockerfile(text: str) -> dict[str, Any]:
    """FROM, ARGs, ENVs, the ``name==version`` pins of its RUN lines, the paths it chowns and its USER."""
    # comment lines go first (Docker drops them, also inside a continued RUN), then continuations are joined
    code = "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("#"))
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", code).splitlines() if ln.strip()]
    out: dict[str, Any] = {"from": None, "args": {}, "env": {}, "pins": {}, "owned": [], "user": None,
                           "image": None, "run": []}
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            out["from"] = rest.split()[0]
        elif instr == "ARG":
            key, _, val = rest.partition("=")
            out["args"][key.strip()] = val.strip().strip('"')
        elif instr == "ENV":
            for word in shlex.split(rest):
                key, _, val = word.partition("=")
                out["env"][key] = val
        elif instr == "USER":
            out["user"] = rest.split(":")[0].strip()
        elif instr == "RUN":
            out["run"].append(rest)
            for m in re.finditer(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9_.\-]*(?:\[[^\]]*\])?)==([0-9][^\s\"';&|]*)", rest):
                out["pins"][re.sub(r"\[.*\]", "", m.group(1)).lower()] = m.group(2)
            for m in re.finditer(r"chown\s+(?:-R\s+)?(\S+)\s+([^;&|]+)", rest):
                out["owned"] += [(m.group(1).split(":")[0], p) for p in m.group(2).split() if p.startswith("/")]
    m = re.search(r"docker build .*?-t\s+(\S+)", text)
    out["image"] = m.group(1) if m else None
    return out


def pyproject_pins(pyproject: dict[str, Any]) -> dict[str, str]:
    """``{name: version}`` of every ``name==version`` requirement (dependencies and every extra)."""
    project = pyproject["project"]
    reqs = list(project["dependencies"]) + [r for extra in project.get("optional-dependencies", {}).values()
                                            for r in extra]
    pins = {}
    for req in reqs:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9_.\-]*)(\[[^\]]*\])?\s*==\s*([^;\s]+)", req)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


def dockerfile_pin_errors(dockerfile: str, pyproject: dict[str, Any], makefile: str) -> list[str]:
    """Every ``name==version`` the Dockerfile installs equals pyproject.toml's pin (uv: the Makefile's
    UV_VERSION); its base image's Ray and Python are pyproject's."""
    d = parse_dockerfile(dockerfile)
    pins = pyproject_pins(pyproject)
    m = re.search(r"^UV_VERSION\s*:?=\s*(\S+)", makefile, re.M)
    if m:
        pins.setdefault("uv", m.group(1))
    out = []
    if not d["pins"]:
        out.append("the Dockerfile pins no package")
    for name, version in sorted(d["pins"].items()):
        if name not in pins:
            out.append(f"Dockerfile pins {name}=={version}, which pyproject.toml / the Makefile does not pin")
        elif pins[name] != version:
            out.append(f"Dockerfile pins {name}=={version}, pyproject.toml / the Makefile {pins[name]}")
    base = d["from"] or ""
    m = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)", base)
    if not m:
        out.append(f"FROM {base!r}: expected a rayproject/ray:<version>-py<python>-cu<cuda> base")
    else:
        if m.group(1) != pins.get("ray"):
            out.append(f"FROM {base}: Ray {m.group(1)}, pyproject.toml pins ray=={pins.get('ray')}")
        python = f"{m.group(2)}.{m.group(3)}"
        if not re.search(rf">={re.escape(python)}\b", pyproject["project"].get("requires-python", "")):
            out.append(f"FROM {base}: Python {python}, pyproject.toml requires {pyproject['project'].get('requires-python')}")
    if "torch" not in d["pins"]:
        out.append("the Dockerfile does not install the pinned torch (CUDA build)")
    return out


def image_errors(aws: dict[str, Any], manifests: list[dict[str, Any]], dockerfile: str,
                 pyproject: dict[str, Any]) -> list[str]:
    """Every container image the configs name is the one the Dockerfile documents (``docker build -t``), and
    its tag carries the project's version."""
    image = parse_dockerfile(dockerfile)["image"]
    out = [] if image else ["the Dockerfile documents no `docker build ... -t <image>`"]
    version = pyproject["project"]["version"]
    if image and not image.rsplit(":", 1)[-1].startswith(version):
        out.append(f"image {image}: its tag does not start with the project version {version}")
    used = {"aws docker.image": (aws.get("docker") or {}).get("image")}
    for kind in ("head_image", "worker_image"):
        if (aws.get("docker") or {}).get(kind):
            used[f"aws docker.{kind}"] = aws["docker"][kind]
    for name, node in aws["available_node_types"].items():
        if (node.get("docker") or {}).get("worker_image"):
            used[f"aws {name}.docker.worker_image"] = node["docker"]["worker_image"]

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("image"), str):
                used[where] = node["image"]
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    for doc in manifests:
        walk(doc, f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}")
    out += [f"{where}: image {got!r}, the Dockerfile builds {image!r}" for where, got in used.items() if got != image]
    return out


_WRITE = re.compile(r"(?:^|[;&|]\s*|\s)(sudo\s+)?(?:mkdir\s+(?:-p\s+)?|tee\s+(?:-a\s+)?|touch\s+)(/[^\s;&|]+)")
_SYNC = re.compile(r"(sudo\s+)?aws\s+s3\s+(?:sync|cp)\s+(?:--\S+\s+)*\S+\s+(/[^\s;&|]+)")
_REDIRECT = re.compile(r">{1,2}\s*(/[^\s;&|]+)")


def _written_paths(command: str) -> list[tuple[str, bool]]:
    """(absolute path, via sudo) for each path a shell command creates or writes."""
    found = [(m.group(2), bool(m.group(1))) for m in _WRITE.finditer(command)]
    found += [(m.group(2), bool(m.group(1))) for m in _SYNC.finditer(command)]
    found += [(m.group(1), False) for m in _REDIRECT.finditer(command) if not m.group(1).startswith("/dev/")]
    return found


def setup_path_errors(aws: dict[str, Any], dockerfile: str) -> list[str]:
    """The launcher's commands only write where their user may: setup commands run in the container as the
    image's user (its home, or a path the image chowns to it), initialization commands on the host as
    ``auth.ssh_user`` (its home), anything else through sudo."""
    d = parse_dockerfile(dockerfile)
    image = (aws.get("docker") or {}).get("image")
    ours = image is not None and image == d["image"]
    user = (d["user"] or "ray") if ours else "ray"  # rayproject/ray images run as ray (uid 1000)
    owned = [p for u, p in d["owned"] if u == user] if ours else []
    container_ok = [f"/home/{user}", "/tmp", *owned]
    host_user = (aws.get("auth") or {}).get("ssh_user", "ubuntu")
    host_ok = [f"/home/{host_user}", "/tmp"]
    groups = [(key, aws.get(key) or [], container_ok)
              for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")]
    groups.append(("initialization_commands", aws.get("initialization_commands") or [], host_ok))
    for name, node in aws["available_node_types"].items():
        groups.append((f"{name}.initialization_commands", node.get("initialization_commands") or [], host_ok))
        groups.append((f"{name}.worker_setup_commands", node.get("worker_setup_commands") or [], container_ok))
    out = []
    for where, commands, allowed in groups:
        owner = user if allowed is container_ok else host_user
        allowed = list(allowed)
        for cmd in commands:
            for m in re.finditer(r"chown\s+(?:-R\s+)?([^\s:]+)(?::\S+)?\s+([^;&|]+)", cmd):  # handed to the user
                if m.group(1) == owner:
                    allowed += [p for p in m.group(2).split() if p.startswith("/")]
            for path, sudo in _written_paths(cmd):
                if not sudo and not any(path == a or path.startswith(a.rstrip("/") + "/") for a in allowed):
                    who = "the container user" if owner == user and where.endswith("setup_commands") else "the host user"
                    out.append(f"{where}: {cmd[:80]!r} writes {path} as {who} {owner!r}, who owns only {allowed}")
    return out
