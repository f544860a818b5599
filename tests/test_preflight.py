"""The static TP preflight against vLLM's sharding rules, on synthetic configs."""

from __future__ import annotations

from workbench.preflight import preflight

LLAMA_70B_LIKE = {"hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 29568}


def with_quant(config, **qc):
    return {**config, "quantization_config": qc}


def test_full_precision_loads_wherever_heads_split():
    table = preflight(LLAMA_70B_LIKE, [1, 2, 4, 8, 16, 3])
    assert [tp for tp, reasons in table.items() if not reasons] == [1, 2, 4, 8, 16]
    assert "num_attention_heads 64 not divisible by tp 3" in table[3][0]


def test_kv_heads_replicate_only_evenly():
    config = {"hidden_size": 4096, "num_attention_heads": 48, "num_key_value_heads": 6, "intermediate_size": 12288}
    table = preflight(config, [2, 3, 4, 6, 12])
    assert table[2] == [] and table[3] == [] and table[6] == [] and table[12] == []
    assert any("num_key_value_heads 6 not divisible by tp 4" in r for r in table[4])


def test_gptq_group_128_with_intermediate_29568_loads_only_at_tp1():
    """29568 / 2 = 14784 = 115.5 groups of 128: vLLM's 'input size is not aligned' at TP=2."""
    table = preflight(with_quant(LLAMA_70B_LIKE, quant_method="gptq", bits=4, group_size=128), [1, 2, 4, 8], marlin=False)
    assert table[1] == []
    for tp in (2, 4, 8):
        assert any(r.startswith("down_proj: per-rank input") and "group_size 128" in r for r in table[tp]), table[tp]
    assert all("o_proj" not in r for r in table[2])  # 8192 / 2 is aligned


def test_marlin_tiles_refuse_per_rank_14784_at_tp2():
    """Channel-wise GPTQ (no groups): only Marlin's min_thread_k=128 refuses down_proj's 14784 inputs at TP=2."""
    config = with_quant(LLAMA_70B_LIKE, quant_method="gptq", bits=4, group_size=-1)
    on_gpu = preflight(config, [1, 2])
    assert on_gpu[1] == []
    assert on_gpu[2] == ["down_proj: Marlin needs per-rank input % 128 == 0, got 14784"]
    assert preflight(config, [2], marlin=False)[2] == []


def test_marlin_output_tile_for_column_parallel_layers():
    config = with_quant({**LLAMA_70B_LIKE, "intermediate_size": 14784}, quant_method="awq", bits=4, group_size=64)
    reasons = preflight(config, [2])[2]
    assert "gate_proj: Marlin needs per-rank output % 64 == 0, got 7392" in reasons
    assert "up_proj: Marlin needs per-rank output % 64 == 0, got 7392" in reasons


def test_fp8_block_sizes():
    config = with_quant(LLAMA_70B_LIKE, quant_method="fp8", activation_scheme="dynamic", weight_block_size=[128, 128])
    table = preflight(config, [1, 2])
    assert table[1] == []
    assert "down_proj: per-rank input 14784 not a multiple of FP8 block_k 128" in table[2]
    assert "gate_proj: per-rank output 14784 not a multiple of FP8 block_n 128" in table[2]


def test_fp8_blocks_at_tp1_bind_every_merged_shard_but_the_last():
    """vLLM at TP=1 checks q and k of qkv_proj and gate of gate_up_proj (the last shard may end in a partial
    block) and no row-parallel input: 2 KV heads of 32 (k_proj 64) refuse, v_proj and down_proj's 320 do not."""
    config = with_quant({"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 320},
                        quant_method="fp8", activation_scheme="dynamic", weight_block_size=[128, 128])
    table = preflight(config, [1, 2])
    assert table[1] == ["k_proj: per-rank output 64 not a multiple of FP8 block_n 128",
                        "gate_proj: per-rank output 320 not a multiple of FP8 block_n 128"]
    assert "v_proj: per-rank output 32 not a multiple of FP8 block_n 128" in table[2]
    assert "down_proj: per-rank input 160 not a multiple of FP8 block_k 128" in table[2]


def test_compressed_tensors_w4a16_group_size_is_found():
    config = with_quant(LLAMA_70B_LIKE, quant_method="compressed-tensors", config_groups={
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "group_size": 128, "strategy": "group"},
                    "input_activations": None}})
    assert any("group_size 128" in r for r in preflight(config, [2], marlin=False)[2])


def test_w8a8_int8_has_no_group_constraint():
    config = with_quant(LLAMA_70B_LIKE, quant_method="compressed-tensors", config_groups={
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
                    "input_activations": {"num_bits": 8, "type": "int", "dynamic": True}}})
    assert preflight(config, [2, 4, 8])[8] == []


QWEN3_30B_A3B_LIKE = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                      "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
                      "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": []}
MIXTRAL_8X7B_LIKE = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                     "num_local_experts": 8, "num_experts_per_tok": 2}


def test_moe_experts_split_their_own_intermediate_size():
    """Qwen3-30B-A3B's FP8 release (blocks of 128): each expert's 768 split 4 ways is 192 per rank, which
    vLLM refuses ('not divisible by weight quantization block_n'); its dense intermediate_size (6144) is used
    by no layer and is not checked. Mixtral's experts use intermediate_size."""
    table = preflight(with_quant(QWEN3_30B_A3B_LIKE, quant_method="fp8", weight_block_size=[128, 128]), [1, 2, 4, 8])
    assert table[1] == [] and table[2] == []
    assert "experts.gate_up_proj: per-rank output 192 not a multiple of FP8 block_n 128" in table[4]
    assert "experts.down_proj: per-rank input 96 not a multiple of FP8 block_k 128" in table[8]
    assert not [r for r in table[4] + table[8] if r.startswith(("gate_proj", "up_proj", "down_proj"))]
    mixtral = preflight(with_quant(MIXTRAL_8X7B_LIKE, quant_method="gptq", bits=4, group_size=128), [1, 2, 4, 8, 16])
    assert all(not reasons for reasons in mixtral.values())  # 14336 / 16 = 896 = 7 groups of 128
    mixtral_groups_of_256 = preflight(with_quant(MIXTRAL_8X7B_LIKE, quant_method="gptq", bits=4, group_size=256), [8, 16], marlin=False)
    assert mixtral_groups_of_256[8] == [] and len(mixtral_groups_of_256[16]) == 1
    assert mixtral_groups_of_256[16][0].startswith("experts.down_proj: per-rank input 896 not a multiple of group_size 256")
