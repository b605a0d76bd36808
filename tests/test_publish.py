"""Publishing checkpoint folders to a Hub repo, and serving the app from it (a local Hub-like server)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import launch_app, make_pair, run_module
from fake_hub import serve_hub

from lesionstudio.publish import PublishError, folder_operations, model_folders

REPO = "lesion/models"


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    root = tmp_path / "ckpts"
    make_pair(root, 32)
    make_pair(root, 64, coarse=32)
    (root / "vqvae-64" / "README.md").write_text("---\nlicense: cc-by-nc-sa-4.0\n---\n# card\n")
    (root / "vqvae-64" / "samples.png").write_bytes(b"\x89PNG not really")
    (root / "vqvae-64" / "checkpoint.pt").write_bytes(b"training state, never published")
    (root / "notes").mkdir()  # not a model folder
    return root


def _env(endpoint: str, tmp_path: Path) -> dict:
    return {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": "hf_test",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def test_every_model_folder_goes_into_its_subfolder(checkpoints: Path):
    assert [f.name for f in model_folders(checkpoints)] == ["pixelcnn-32", "pixelcnn-64", "vqvae-32", "vqvae-64"]
    paths = [op.path_in_repo for op in folder_operations(checkpoints / "vqvae-64")]
    assert paths == [
        "vqvae-64/config.json",
        "vqvae-64/model.safetensors",
        "vqvae-64/codebook_usage.json",
        "vqvae-64/README.md",
        "vqvae-64/samples.png",
    ]
    assert [op.path_in_repo for op in folder_operations(checkpoints / "vqvae-64", "vqvae-64-v2")][0].startswith(
        "vqvae-64-v2/"
    )
    with pytest.raises(PublishError, match="no model folder"):
        model_folders(checkpoints / "notes")
    with pytest.raises(PublishError, match="does not exist"):
        model_folders(checkpoints / "nowhere")
    (checkpoints / "pixelcnn-32" / "model.safetensors").unlink()
    with pytest.raises(PublishError, match="no model.safetensors"):
        folder_operations(checkpoints / "pixelcnn-32")


def test_publish_then_serve_the_app_from_the_hub(checkpoints: Path, tmp_path: Path, tmp_path_factory):
    hub_folder = tmp_path / "hub"
    hub_folder.mkdir()
    with serve_hub(REPO, hub_folder) as (endpoint, repo):
        env = _env(endpoint, tmp_path)
        res = run_module(
            ["-m", "lesionstudio.publish", "--repo", REPO, "--checkpoints", str(checkpoints), "--revision", "v1"],
            env=env,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert "uploaded pixelcnn-32, pixelcnn-64, vqvae-32, vqvae-64" in res.stdout
        assert len(repo.commits) == 1 and repo.commits[0]["revision"] == "v1"  # one commit
        published = sorted(p.relative_to(hub_folder).as_posix() for p in hub_folder.rglob("*") if p.is_file())
        assert "vqvae-64/checkpoint.pt" not in published and "vqvae-64/README.md" in published
        for rel in published:  # the same bytes as the source folders
            assert (hub_folder / rel).read_bytes() == (checkpoints / rel).read_bytes()
        assert {f"{m}-{n}/model.safetensors" for m in ("vqvae", "pixelcnn") for n in (32, 64)} <= set(published)

        # the app, started on the repo, samples from the published stack
        from gradio_client import Client

        gen = launch_app(tmp_path_factory, hub=REPO, env={**env, "HF_HUB_OFFLINE": "0"})
        url = next(gen)
        try:
            gallery, _, _ = Client(url, verbose=False).predict("64", 1.0, 2, 3, "benign", api_name="/generate")
            assert len(gallery) == 2
        finally:
            next(gen, None)
        downloads = [r for r in repo.requests if r.startswith("GET") and "/resolve/" in r]
        assert any(r.endswith("pixelcnn-64/model.safetensors") for r in downloads)
        assert not any(r.endswith(("README.md", ".png")) for r in downloads)  # only what the app reads

    # a Hub error is a message and an exit code, not a traceback
    with serve_hub("other/repo", hub_folder) as (endpoint, _):
        res = run_module(
            ["-m", "lesionstudio.publish", "--repo", REPO, "--checkpoints", str(checkpoints)],
            env=_env(endpoint, tmp_path),
        )
        assert res.returncode != 0 and res.stderr.startswith("error:") and "Traceback" not in res.stderr
