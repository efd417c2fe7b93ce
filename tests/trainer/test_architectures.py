"""Every method on every causal-LM family: blocks are found by shape, not by Llama's names.

Tiny random models of five families (Llama, Qwen2, GPT-2, GPT-NeoX, OPT), built from configs with the project's
tokenizer, train two steps with each method through the real trainer. A model whose blocks cannot be found is
refused before anything trains: in the API, by the sweep and by the single-run command (exit 2, one line).

    python -m pytest -q tests/trainer/test_architectures.py
"""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from tests.conftest import run_cli
from trainer import TrainConfig, UserError, train
from trainer.architecture import decoder_blocks, final_norm, meta_model
from trainer.methods import METHODS, check_method_supports, get_method

N_LAYERS = 3
# (config class, its arguments): hidden 64, 3 blocks, 4 heads; vocabulary and special tokens from the tokenizer
FAMILIES = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=N_LAYERS, n_head=4, n_positions=128)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                                       num_attention_heads=4, max_position_embeddings=128)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                              word_embed_proj_dim=64, max_position_embeddings=128)),
}
# where each family keeps its blocks and final norm (what the search must find without being told)
WHERE = {"llama": ("model.layers", "model.norm"), "qwen2": ("model.layers", "model.norm"),
         "gpt2": ("transformer.h", "transformer.ln_f"), "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm"),
         "opt": ("model.decoder.layers", "model.decoder.final_layer_norm")}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, tokenizer) -> dict:
    """One saved tiny random model per family, with the project's tokenizer."""
    import transformers
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for family, (config_class, kwargs) in FAMILIES.items():
        config = getattr(transformers, config_class)(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **kwargs)
        torch.manual_seed(0)
        dirs[family] = root / family
        AutoModelForCausalLM.from_config(config).save_pretrained(dirs[family])
        tokenizer.save_pretrained(dirs[family])
    return dirs


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_and_final_norm_are_found_on_every_family(family, family_dirs):
    model = meta_model(family_dirs[family])
    name, blocks = decoder_blocks(model)
    assert (name, len(blocks)) == (WHERE[family][0], N_LAYERS)
    assert final_norm(model)[0] == WHERE[family][1]
    check_method_supports(list(METHODS), family_dirs[family])  # no method refuses it


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_trains_every_family(family, method, family_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_SWEEPS_CACHE", str(tmp_path))  # the base-model figures of throwaway models
    cfg = TrainConfig(model=str(family_dirs[family]), method=method, train_data="builtin:facts:8",
                      eval_data="builtin:facts-heldout:4", max_steps=2, batch_size=2, seq_len=32, learning_rate=3e-3,
                      scheduler="constant", report_every=2, eval_every=None, memorization=False, forgetting=False,
                      lora_r=4, threads=1, device="cpu")
    result = train(cfg)

    assert result.status == "completed", result.reason
    by_layer = {row["layer"]: row for row in result.metrics["weight_change_by_layer"]}
    blocks = [f"block {i}" for i in range(N_LAYERS)]
    assert [key for key in by_layer if key.startswith("block")] == blocks
    changed = {key for key, row in by_layer.items() if row["changed_fraction"] > 0}
    if method == "last_layer":  # the last block and the final norm: not the head, not the embeddings
        assert changed == {blocks[-1], WHERE[family][1].split(".")[-1]}
    else:  # full trains every block; lora adapts every linear layer (GPT-2's Conv1D included)
        assert set(blocks) <= changed
    if method == "lora":
        assert not any(r["rel_change"] for r in result.weight_change if "norm" in r["name"] or "ln_" in r["name"])


# --- a model whose blocks cannot be found ---------------------------------------------

_NO_BLOCKS_CODE = '''
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class NoBlocksConfig(PretrainedConfig):
    model_type = "noblocks"

    def __init__(self, vocab_size=64, hidden_size=16, num_hidden_layers=2, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        super().__init__(**kwargs)


class NoBlocksForCausalLM(PreTrainedModel):
    """A causal LM whose blocks are an nn.Sequential: no ModuleList of blocks."""

    config_class = NoBlocksConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.Sequential(*(nn.Linear(config.hidden_size, config.hidden_size)
                                      for _ in range(config.num_hidden_layers)))
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return CausalLMOutput(logits=self.head(self.blocks(self.embed(input_ids))))
'''


@pytest.fixture(scope="session")
def no_blocks_dir(tmp_path_factory, tokenizer):
    """A model directory of remote code (``trust_remote_code``) whose blocks are no ModuleList; config only."""
    out = tmp_path_factory.mktemp("noblocks")
    (out / "modeling_noblocks.py").write_text(textwrap.dedent(_NO_BLOCKS_CODE))
    config = {"model_type": "noblocks", "architectures": ["NoBlocksForCausalLM"], "vocab_size": len(tokenizer),
              "hidden_size": 16, "num_hidden_layers": 2,
              "auto_map": {"AutoConfig": "modeling_noblocks.NoBlocksConfig",
                           "AutoModelForCausalLM": "modeling_noblocks.NoBlocksForCausalLM"}}
    (out / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(out)
    return out


def test_a_model_without_findable_blocks_is_refused_naming_the_method(no_blocks_dir, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("modeling_noblocks", no_blocks_dir / "modeling_noblocks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.device("meta"):
        model = module.NoBlocksForCausalLM(module.NoBlocksConfig())
    with pytest.raises(LookupError, match="NoBlocksForCausalLM has no torch.nn.ModuleList of 2 modules"):
        decoder_blocks(model)
    assert "cannot find the decoder blocks" in get_method("last_layer").check(model)
    assert all(get_method(m).check is None or not get_method(m).check(model) for m in METHODS if m != "last_layer")

    monkeypatch.setattr("trainer.architecture.meta_model", lambda *a, **kw: model)  # no remote code in this process
    with pytest.raises(UserError, match=r"^method last_layer: model M: cannot find the decoder blocks"):
        check_method_supports(["full", "lora", "last_layer"], no_blocks_dir, model_label="M")
    check_method_supports(["full", "lora"], no_blocks_dir)


def _refused(proc, *names: str) -> None:
    """Exit 2, one line naming the file, the method and the model, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "method last_layer:" in error[0] and "cannot find the decoder blocks" in error[0], proc.stderr
    assert all(name in error[0] for name in names), error[0]


def test_the_sweep_refuses_the_model_before_it_starts(no_blocks_dir, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: no-blocks\nmodel: {no_blocks_dir}\nsearch: {{algorithm: grid}}\n"
                    "space:\n  method: [full, last_layer]\n  learning_rate: [0.001]\n"
                    f"data: {{train: 'builtin:facts:8'}}\ntrain: {{trust_remote_code: true}}\noutput_dir: {tmp_path / 'out'}\n")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = run_cli(["sweeps/run.py", str(spec)], timeout=180, env=env)
    _refused(proc, str(spec), str(no_blocks_dir))
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists(), "nothing may be written"


def test_the_single_run_command_refuses_the_model_before_training(no_blocks_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {no_blocks_dir}\nmethod: last_layer\ntrust_remote_code: true\n"
                      f"train_data: 'builtin:facts:8'\noutput_dir: {tmp_path / 'out'}\n")
    proc = run_cli(["-m", "trainer.train", str(config)], timeout=180, env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    _refused(proc, str(config), str(no_blocks_dir))
    assert not (tmp_path / "out").exists()
