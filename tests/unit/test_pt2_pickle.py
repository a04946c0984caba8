"""A .pt2 is loaded without the unrestricted unpickler unless --allow-pickle: a crafted archive whose payload
would write a marker file is refused before torch.export.load runs, and the marker is never written."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from models.loaders import ModelLoadError, load_model, pt2_pickle_use  # noqa: E402


class _Payload:
    """Unpickling this writes `marker` (what an attacker's payload would do instead)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def _write_marker(path: str) -> torch.Tensor:
    Path(path).write_text("unpickled")
    return torch.zeros(1)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def _normal_pt2(path: Path) -> Path:
    torch.export.save(torch.export.export(_Tiny().eval(), (torch.randn(1, 4),)), path)
    return path


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes]) -> Path:
    """Copy zip `src` to `dst`, replacing members (named without the archive's top folder)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            zout.writestr(info, replace.get(rel, zin.read(info.filename)))
    return dst


def _pickled(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    return buf.getvalue()


@pytest.fixture()
def normal(tmp_path: Path) -> Path:
    return _normal_pt2(tmp_path / "normal.pt2")


def _evil_sample_inputs(normal: Path, tmp_path: Path, marker: Path) -> Path:
    return _rewrite(normal, tmp_path / "evil_inputs.pt2", {"data/sample_inputs/model.pt": _pickled(marker)})


def _evil_weight(normal: Path, tmp_path: Path, marker: Path) -> Path:
    with zipfile.ZipFile(normal) as zf:
        name = next(n for n in zf.namelist() if n.endswith("data/weights/model_weights_config.json"))
        config = json.loads(zf.read(name))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    return _rewrite(normal, tmp_path / "evil_weight.pt2", {
        "data/weights/model_weights_config.json": json.dumps(config).encode(),
        f"data/weights/{first['path_name']}": _pickled(marker),
    })


@pytest.mark.parametrize("craft, why", [(_evil_sample_inputs, "data/sample_inputs/model.pt needs pickle"),
                                        (_evil_weight, "is stored pickled (use_pickle)")])
def test_a_pt2_needing_pickle_is_refused_and_its_payload_never_runs(normal: Path, tmp_path: Path, craft, why) -> None:
    marker = tmp_path / "marker"
    evil = craft(normal, tmp_path, marker)
    with pytest.raises(ModelLoadError) as err:
        load_model(evil, tmp_path / "work")
    message = str(err.value)
    assert "\n" not in message and why in message
    assert "--allow-pickle" in message and "unpickling runs arbitrary code from the file" in message
    assert not marker.exists()


def test_the_crafted_pt2_would_run_its_payload_in_torch_export_load(normal: Path, tmp_path: Path) -> None:
    # What the refusal prevents: torch.export.load itself runs the payload (so the test above tests something).
    marker = tmp_path / "marker"
    evil = _evil_sample_inputs(normal, tmp_path, marker)
    try:
        torch.export.load(str(evil))
    except Exception:  # noqa: BLE001 - the payload returns a tensor where inputs were expected
        pass
    assert marker.exists()


def test_with_allow_pickle_the_check_is_skipped(normal: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = _evil_sample_inputs(normal, tmp_path, marker)
    with pytest.raises(ModelLoadError) as err:  # it unpickles (the user trusted it) and fails on what it got
        load_model(evil, tmp_path / "work", allow_pickle=True)
    assert marker.exists() and "allow-pickle" not in str(err.value)


def test_a_normal_pt2_still_loads(normal: Path, tmp_path: Path) -> None:
    assert pt2_pickle_use(normal, torch) is None
    loaded = load_model(normal, tmp_path / "work")
    assert loaded.format == "torch.export" and loaded.inputs[0].shape[1:] == (4,)


def test_compiled_code_in_a_pt2_is_refused(normal: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(normal, "a") as zf:
        top = zf.namelist()[0].split("/", 1)[0]
        zf.writestr(f"{top}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ModelLoadError, match="compiled native code.*--allow-pickle"):
        load_model(normal, tmp_path / "work")
