"""Code that comes with a checkpoint never runs: trust_remote_code=False on every transformers loader, cell and
training processes with stdin from /dev/null, safetensors before pickle (issue 15, part 2, item 2)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engines.errors import BadInput

REPO = Path(__file__).resolve().parent.parent


def checkpoint_with_its_own_code(root: Path) -> tuple[Path, Path]:
    """A checkpoint whose config names a model type transformers does not know, to be built by its own Python
    file (auto_map); that file, if ever imported, leaves a marker."""
    ckpt, marker = root / "ckpt", root / "the-checkpoint-code-ran"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "evil_moe", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}}))
    (ckpt / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                  "from transformers import PretrainedConfig\n"
                                  "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_moe'\n")
    return ckpt, marker


def test_compare_with_yes_on_stdin_refuses_a_checkpoint_that_brings_code(tmp_path):
    """Old code: `yes y | specmoe-bench compare --model DIR` answered transformers' prompt and ran evil.py."""
    ckpt, marker = checkpoint_with_its_own_code(tmp_path)
    out = subprocess.run([sys.executable, "-m", "harness.cli", "compare", "--engines", "offload", "--model",
                          str(ckpt), "--workload", "synthetic-ids", "--results-dir", str(tmp_path / "runs"),
                          "--max-new-tokens", "2", "--iterations", "1", "--warmup", "0"],
                         input="y\n" * 100, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))
    assert not marker.exists()
    assert out.returncode == 2, out.stderr
    assert "never runs a checkpoint's own code (trust_remote_code=False)" in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_the_loader_itself_refuses_it_too(tmp_path):
    from workloads.models import load_model
    ckpt, marker = checkpoint_with_its_own_code(tmp_path)
    with pytest.raises(BadInput, match="trust_remote_code=False"):
        load_model(str(ckpt))
    assert not marker.exists()


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """The same tiny random Mixtral saved as safetensors and as a pickle (pytorch_model.bin)."""
    from workloads.models import load_model
    root = tmp_path_factory.mktemp("ckpt")
    model = load_model("tiny-mixtral-random").model
    model.save_pretrained(root / "st")
    import torch
    model.config.save_pretrained(root / "pickle")  # transformers 5 writes only safetensors: the pickle by hand
    torch.save(model.state_dict(), root / "pickle" / "pytorch_model.bin")
    return root


def test_a_pickle_only_checkpoint_loads_tensors_only_and_says_so(tiny_checkpoints):
    import torch

    from workloads.models import load_model
    assert not list((tiny_checkpoints / "pickle").glob("*.safetensors"))
    pickled, safe = load_model(str(tiny_checkpoints / "pickle")), load_model(str(tiny_checkpoints / "st"))
    assert "torch.load(weights_only=True)" in pickled.notes["weights"] and "weights" not in safe.notes
    for (name, a), (_, b) in zip(pickled.model.state_dict().items(), safe.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_pickle_that_carries_code_is_refused_without_running_it(tmp_path, tiny_checkpoints):
    import shutil
    ckpt, marker = tmp_path / "ckpt", tmp_path / "the-pickle-code-ran"
    shutil.copytree(tiny_checkpoints / "pickle", ckpt)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch
    torch.save({"model.embed_tokens.weight": Payload()}, ckpt / "pytorch_model.bin")
    from workloads.models import load_model
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        load_model(str(ckpt))
    assert not marker.exists()
