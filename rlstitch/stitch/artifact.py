"""StitchVM artifacts: weights.safetensors (stitch + reward tail) and manifest.json, checked on load.

Loading against another backbone or reward than the manifest names fails with a clear error, and so does a
weights file whose SHA-256 differs from the manifest's (truncated or altered).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from rlstitch.io import atomic_save, atomic_write_text, sha256
from rlstitch.models.fingerprint import fingerprint
from rlstitch.stitch.layer import StitchLayer
from rlstitch.stitch.vm import StitchVM

FORMAT_VERSION = 1
REQUIRED = ("backbone", "reward", "i", "j", "grid_u", "grid_r", "d_u", "d_r", "weights_sha256")


class ArtifactError(ValueError):
    """A StitchVM artifact that cannot be used with the given models."""


def save(vm: StitchVM, out: str | Path, **extra) -> Path:
    """Write the artifact; `extra` goes into the manifest (fit residuals, training config, eval figures)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"layer.{k}": v for k, v in vm.layer.state_dict().items()}
    state |= {f"tail.{k}": v for k, v in vm.tail.state_dict().items()}
    atomic_save(state, out / "weights.safetensors")
    manifest = {
        "format_version": FORMAT_VERSION,
        "backbone": {"name": vm.backbone.name, "fingerprint": fingerprint(vm.backbone)},
        "reward": {"name": vm.reward.name, "kind": vm.reward.kind, "fingerprint": fingerprint(vm.reward)},
        "i": vm.i,
        "j": vm.j,
        "grid_u": list(vm.layer.grid_u),
        "grid_r": list(vm.layer.grid_r),
        "d_u": vm.layer.d_u,
        "d_r": vm.layer.d_r,
        "weights_sha256": sha256(out / "weights.safetensors"),
        **extra,
    }
    # The manifest goes last: a folder without one is visibly incomplete.
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return out


def read_manifest(path: str | Path) -> dict:
    """The manifest of an artifact folder, with a clear error when missing or unreadable."""
    f = Path(path) / "manifest.json"
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{f}: not a StitchVM artifact manifest ({e})") from e


def update_manifest(path: str | Path, **fields) -> None:
    """Add or replace manifest fields (e.g. eval figures), atomically."""
    manifest = read_manifest(path) | fields
    atomic_write_text(Path(path) / "manifest.json", json.dumps(manifest, indent=2))


def _check_model(manifest: dict, role: str, model) -> None:
    """The manifest's backbone/reward must be the given model: same name and weights fingerprint."""
    want = manifest[role]
    if want["name"] != model.name:
        raise ArtifactError(f"stitch was built for {role} {want['name']!r}, got {model.name!r}")
    got = fingerprint(model)
    if want["fingerprint"] != got:
        raise ArtifactError(
            f"stitch was built for {role} {want['name']!r} with weights fingerprint {want['fingerprint']}, "
            f"but the loaded weights have {got}: rebuild the stitch for these weights"
        )


def check_weights(wfile: Path, digest: str | None) -> None:
    """A missing weights file, or one whose SHA-256 differs from the manifest's (None: none recorded), fails."""
    if not wfile.is_file() or (digest is not None and sha256(wfile) != digest):
        raise ArtifactError(f"{wfile}: missing, truncated or altered (SHA-256 does not match the manifest)")


def load(path: str | Path, backbone, reward) -> StitchVM:
    """A StitchVM from an artifact folder, verified against the given backbone and reward."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    for key in REQUIRED:
        if key not in manifest:
            raise ArtifactError(f"{path / 'manifest.json'}: missing field {key!r}")
    _check_model(manifest, "backbone", backbone)
    _check_model(manifest, "reward", reward)
    wfile = path / "weights.safetensors"
    check_weights(wfile, manifest["weights_sha256"])
    layer = StitchLayer(manifest["d_u"], manifest["d_r"], tuple(manifest["grid_u"]), tuple(manifest["grid_r"]))
    vm = StitchVM(backbone, reward, layer, manifest["i"], manifest["j"])
    state = load_file(wfile)
    vm.layer.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("layer.")})
    vm.tail.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("tail.")})
    vm.manifest = manifest
    return vm.eval()
