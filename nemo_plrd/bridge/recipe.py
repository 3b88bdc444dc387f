"""A Megatron-Bridge recipe function for one PLRD stage of an HF LLaMA-family model.

Shaped like Bridge's own recipes (a function returning the job's whole ``ConfigContainer``),
with the ``plrd:`` section added; YAML and command-line overrides then adjust it
(``recipes/run_plrd.py``). The defaults are for GPUs; a YAML sets what a run needs beyond them.
"""

from __future__ import annotations

from megatron.bridge.models import AutoBridge
from transformers import AutoConfig
from megatron.bridge.training.config import (CheckpointConfig, DistributedDataParallelConfig, GPTDatasetConfig,
                                             LoggerConfig, OptimizerConfig, SchedulerConfig, TokenizerConfig)

from nemo_plrd.bridge.config import PLRDConfigContainer, PLRDTrainingConfig
from nemo_plrd.config import PLRDConfig, PlanConfig


def llama_stage(hf_path: str, keep: float = 0.6, seq_length: int = 4096) -> PLRDConfigContainer:
    """Decompose the parent to ``keep`` of its dense linear-layer parameters and train on; ``hf_path``
    holds the parent's HF config and tokenizer (an HF model, or a PLRD checkpoint's ``hf/``)."""
    # The architecture only: one of the stage's pre-wrap hooks loads the weights (nemo_plrd.bridge.stage).
    provider = AutoBridge.from_hf_config(AutoConfig.from_pretrained(hf_path)).to_megatron_provider(load_weights=False)
    provider.seq_length = seq_length
    return PLRDConfigContainer(
        model=provider,
        train=PLRDTrainingConfig(train_iters=1000, global_batch_size=256, micro_batch_size=1),
        optimizer=OptimizerConfig(optimizer="adam", lr=1e-4, min_lr=1e-5, weight_decay=0.01, adam_beta2=0.95,
                                  clip_grad=1.0, use_distributed_optimizer=False),
        scheduler=SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=50, start_weight_decay=0.01,
                                  end_weight_decay=0.01),
        ddp=DistributedDataParallelConfig(use_distributed_optimizer=False),
        dataset=GPTDatasetConfig(blend=None, split="99,1,0", seq_length=seq_length, random_seed=1234,
                                 reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                                 dataloader_type="single"),
        logger=LoggerConfig(log_interval=10),
        tokenizer=TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=hf_path),
        checkpoint=CheckpointConfig(save=None, save_interval=100, ckpt_format="torch_dist"),
        plrd=PLRDConfig(plan=PlanConfig(keep=keep)),
    )
