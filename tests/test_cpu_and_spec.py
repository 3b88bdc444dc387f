import functools

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_plrd.cpu import CpuRNGStatesTracker, TorchNorm
from nemo_plrd.layers import LowRankColumnParallelLinear, LowRankRowParallelLinear
from nemo_plrd.model import SMOLLM2_135M, LlamaArch
from nemo_plrd.report import duration, format_table
from nemo_plrd.slots import break_even_rank
from nemo_plrd.spec import low_rank_block_spec, low_rank_layer_spec, spec_submodules


def test_rng_tracker_fork_is_reproducible_and_leaves_default_stream_alone():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # default stream untouched
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(4)
    assert not torch.equal(first, second)  # the forked stream advances
    assert torch.equal(first, torch.rand(4, generator=torch.Generator().manual_seed(123)))
    with pytest.raises(ValueError, match="seed 123 is already tracked"):
        tracker.add("other", 123)
    with pytest.raises(KeyError, match="never added"):
        with tracker.fork("missing"):
            pass


def test_torch_norm_marks_params_for_sequence_parallel_reduction():
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                               normalization="RMSNorm", sequence_parallel=True,
                               tensor_model_parallel_size=2)
    norm = TorchNorm(config, 8)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(p.sequence_parallel for p in norm.parameters())


def test_layer_spec_puts_low_rank_layers_in_the_ranked_slots_only():
    spec = low_rank_layer_spec({"linear_qkv": 32, "linear_fc2": 16, "linear_proj": None})
    attention, mlp = (spec_submodules(spec.submodules.self_attention), spec_submodules(spec.submodules.mlp))
    assert attention.linear_qkv.module is LowRankColumnParallelLinear
    assert attention.linear_qkv.params == {"rank": 32}
    assert mlp.linear_fc2.module is LowRankRowParallelLinear
    assert attention.linear_proj.__name__ == "RowParallelLinear"  # None keeps it dense
    assert mlp.linear_fc1.__name__ == "ColumnParallelLinear"
    assert spec.submodules.input_layernorm is TorchNorm


def test_bad_slot_names_and_layer_counts_are_refused():
    with pytest.raises(ValueError, match=r"unknown slot name\(s\) \['linear_q'\]"):
        low_rank_layer_spec({"linear_q": 8})
    config = TransformerConfig(num_layers=3, hidden_size=8, num_attention_heads=1)
    with pytest.raises(ValueError, match="got slot ranks for 2 layers; the model has 3"):
        low_rank_block_spec(config, [{}, {}])
    # what the block spec cannot build is refused, not left out of the model
    pipeline = {"pipeline_model_parallel_size": 2, "pipeline_dtype": torch.float32}
    for settings, named in ((pipeline, "pipeline_model_parallel_size > 1"), ({"num_moe_experts": 4}, "num_moe_experts")):
        with pytest.raises(ValueError, match=f"support dense, single-stage models; the config sets {named}$"):
            low_rank_block_spec(TransformerConfig(num_layers=4, hidden_size=8, num_attention_heads=1, **settings),
                                {"linear_qkv": 4})


def test_a_block_spec_keeps_the_configs_query_and_key_norms():
    config = TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=1, qk_layernorm=True)
    attention = spec_submodules(low_rank_block_spec(config, {"linear_qkv": 4}).layer_specs[1].submodules.self_attention)
    assert attention.linear_qkv.module is LowRankColumnParallelLinear
    assert attention.q_layernorm is not None and attention.q_layernorm.__name__ != "IdentityOp"
    assert attention.k_layernorm is attention.q_layernorm


def test_smollm2_slot_shapes_and_break_even_ranks():
    shapes = SMOLLM2_135M.slot_shapes()
    assert shapes == {"linear_qkv": (960, 576), "linear_proj": (576, 576),
                      "linear_fc1": (3072, 576), "linear_fc2": (576, 1536)}
    assert round(break_even_rank(*shapes["linear_qkv"])) == 360  # docs/design.md, section 3 (break-even)
    assert round(break_even_rank(576, 1536)) == 419
    with pytest.raises(ValueError, match="num_attention_heads=9 must be a multiple of num_query_groups=2"):
        LlamaArch(num_layers=1, hidden_size=576, ffn_hidden_size=8, num_attention_heads=9,
                  num_query_groups=2, vocab_size=8)


def test_format_table_aligns_columns():
    assert format_table(("a", "bb"), [(1, 22), (333, 4)]).splitlines() == [
        "  a  bb", "  1  22", "333   4"]


def test_duration_reads_as_people_say_it():
    assert [duration(s) for s in (0.4, 59.6, 611, 3600, 7325)] == ["0 s", "1 min 0 s", "10 min 11 s", "1 h 00 min",
                                                                    "2 h 02 min"]


def test_spec_submodules_reads_both_shapes_of_a_layer_spec_entry():
    """megatron-core <= 0.16 wraps the MLP in a ModuleSpec; >= 0.17 in a functools.partial."""
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    assert spec_submodules(ModuleSpec(module=MLP, submodules=submodules)) is submodules
    assert spec_submodules(functools.partial(MLP, submodules=submodules)) is submodules


def test_your_own_gpt_model_from_the_block_spec_saves_and_loads_with_ranks_that_differ_by_layer(tmp_path):
    """Factor shapes that differ between layers cannot share megatron's stacked key: the spec sets one per layer."""
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel

    from nemo_plrd.model import transformer_config
    from nemo_plrd.parallel import init_model_parallel

    init_model_parallel(1)
    arch = LlamaArch(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                     vocab_size=64, max_sequence_length=32)

    def own_model(seed: int) -> GPTModel:
        torch.manual_seed(seed)
        config = transformer_config(arch)
        return GPTModel(config, low_rank_block_spec(config, [{"linear_qkv": 16}, {"linear_qkv": 8}]),
                        vocab_size=arch.vocab_size, max_sequence_length=arch.max_sequence_length,
                        position_embedding_type="rope")

    saved, loaded = own_model(0), own_model(1)
    dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path))
    loaded.load_state_dict(dist_checkpointing.load(loaded.sharded_state_dict(), str(tmp_path)))
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values())
               if isinstance(a, torch.Tensor))
