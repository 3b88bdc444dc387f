"""Tensor-parallel low-rank linear layers: W (out x in) ~= up (out x r) @ down (r x in).

Each layer is a composition of megatron-core's own parallel linears and one small linear
replicated over the TP group, arranged so that every tensor-parallel collective carries
r-dimensional activations instead of hidden-sized ones (docs/design.md, section 2):

    column slot (linear_qkv, linear_fc1), input x replicated, output sharded on out:
        z = down(x)          down: r x in,  replicated       no communication
        y = up(z)            up:   out x r, sharded on out   fwd: identity (SP: all-gather z [s,b,r])
                                                              bwd: all-reduce dz [s,b,r] (SP: reduce-scatter,
                                                                   and z gathered again for up's weight grad)
    row slot (linear_proj, linear_fc2), input x sharded on in, output replicated:
        z = down(x)          down: r x in,  sharded on in    fwd: all-reduce z [s,b,r] (SP: reduce-scatter)
                                                              bwd: identity (SP: all-gather dz [s,b,r])
        y = up(z) + bias     up:   out x r, replicated       no communication

The dense layers move [s,b,in] (column backward; SP: its forward and backward gathers too) and
[s,b,out] (row forward; SP: its backward gather too) instead.
r is never a sharded dimension, so it need not divide by the TP size.

Both classes take the keyword arguments megatron's layer specs pass to
``ColumnParallelLinear`` / ``RowParallelLinear`` plus ``rank``, and return
``(output, bias)``, so they drop into ``build_module`` specs and into built models.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_defaults_if_not_set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from megatron.core.utils import get_tensor_model_parallel_group_if_none

from nemo_plrd.slots import COLUMN, ROW


# megatron-core >= 0.17 also splits a torch-FSDP2 parameter's DP shards, given the groups its MLP passes
_SWIGLU_TAKES_GROUPS = "dp_group" in inspect.signature(apply_swiglu_sharded_factory).parameters


def _check_rank(rank: int, out_features: int, in_features: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(out_features, in_features):
        raise ValueError(
            f"rank={rank!r} is invalid for a {out_features}x{in_features} slot: it must be a positive integer "
            f"at most {min(out_features, in_features)} (a wider pair is no more expressive than the dense layer)"
        )


def _check_collectives(tp_group, is_expert: bool, disable_grad_reduce: bool = False) -> None:
    """Refuse the options under which megatron's inner linear leaves its TP collective to a caller (an
    expert's dispatcher; ``disable_grad_reduce``): the replicated factor would then get a different
    partial gradient on each rank, which nothing reduces."""
    if (is_expert or disable_grad_reduce) and tp_group is not None and tp_group.size() > 1:
        raise ValueError(f"{'is_expert' if is_expert else 'disable_grad_reduce'}=True over a TP group of "
                         f"{tp_group.size()} is not supported by the low-rank layers")


class ReplicatedLinear(MegatronModule):
    """A linear layer whose weight is the same on every tensor-parallel rank.

    Its input and output are not communicated. Under sequence parallelism each rank sees
    only its own tokens, so the weight (and bias) gradients are partial sums: they carry
    ``sequence_parallel=True``, which makes megatron's ``finalize_model_grads`` all-reduce
    them over TP once per optimizer step, as it does for norm weights.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Callable[[torch.Tensor], None],
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool = False,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> None:
        super().__init__(config=config)
        self.input_size = input_size
        self.output_size = output_size
        self.skip_bias_add = skip_bias_add
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=config.params_dtype, device=device)
        )
        if config.perform_initialization:
            # Every TP rank draws from the same default-generator state (megatron seeds it
            # identically across TP), so the replicas start equal.
            with torch.no_grad():
                init_method(self.weight)
        if bias:
            self.bias = torch.nn.Parameter(
                torch.zeros(output_size, dtype=config.params_dtype, device=device)
            )
        else:
            self.register_parameter("bias", None)
        all_reduce_over_dp = not (is_expert and config.expert_model_parallel_size > 1)
        for param in self.parameters():
            set_defaults_if_not_set_tensor_model_parallel_attributes(param)
            param.allreduce = all_reduce_over_dp
            param.sequence_parallel = config.sequence_parallel

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.skip_bias_add:
            return F.linear(input_, self.weight), self.bias
        return F.linear(input_, self.weight, self.bias), None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Replicated over TP: the replica id carries the TP rank, so one copy is written."""
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=ensure_metadata_has_dp_cp_group(metadata)["dp_cp_group"],
        )

    def extra_repr(self) -> str:
        return f"in_features={self.input_size}, out_features={self.output_size}, bias={self.bias is not None}, replicated"


def _mark_split(weight: torch.nn.Parameter, dim: int, stride: int) -> None:
    """Mark ``weight`` as split over TP along ``dim``, as megatron's parallel linears do. megatron-core
    before 0.19 marks it only when it initialises the weight, and a stage whose weights are loaded
    (``perform_initialization=False``) needs the mark all the same: the gradient norm, the checkpoint
    layout, the full-model gather and the parameter count read it."""
    if not getattr(weight, "tensor_model_parallel", False):
        weight.tensor_model_parallel, weight.partition_dim, weight.partition_stride = True, dim, stride


def mark_split_weights(model: torch.nn.Module) -> None:
    """Mark the weights of megatron's own parallel layers (dense slots, embedding, output layer) as it marks them
    when it initialises them: a model built to have its weights loaded (a Bridge stage's, on megatron-core before
    0.19, which then marks none) would otherwise count them once per TP rank in its size, its plan's budget and its
    gradient norm. A gated MLP's fc1 is split with stride 2, as megatron's MLP builds it."""
    for name, module in model.named_modules():
        if isinstance(module, VocabParallelEmbedding):
            _mark_split(module.weight, dim=0, stride=1)
        elif isinstance(module, ColumnParallelLinear) and module.weight is not None:  # None: tied to the embedding
            gated_fc1 = name.rsplit(".", 1)[-1] == "linear_fc1" and module.config.gated_linear_unit
            _mark_split(module.weight, dim=0, stride=2 if gated_fc1 else 1)
        elif isinstance(module, RowParallelLinear):
            _mark_split(module.weight, dim=1, stride=1)


class LowRankColumnParallelLinear(MegatronModule):
    """Drop-in for ``ColumnParallelLinear``: replicated ``down`` (r x in), column-parallel ``up`` (out x r).

    Without sequence parallelism, dz is all-reduced inside ``up`` and is then the same on
    every rank, so dx = down^T dz and down's gradient need no further communication: the
    dense layer's all-reduce of dx [s,b,in] is gone.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        rank: int,
        config: ModelParallelConfig,
        init_method: Callable[[torch.Tensor], None],
        bias: bool = True,
        gather_output: bool = False,
        skip_bias_add: bool = False,
        is_expert: bool = False,
        tp_comm_buffer_name: Optional[str] = None,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
        **column_parallel_kwargs,
    ) -> None:
        super().__init__(config=config)
        _check_rank(rank, output_size, input_size)
        self.stride = column_parallel_kwargs.get("stride", 1)
        if self.stride not in (1, 2):
            raise ValueError(f"stride={self.stride} is not supported (1, or 2 for a gated MLP's fc1)")
        self.input_size, self.output_size, self.rank = input_size, output_size, rank
        self.gather_output, self.skip_bias_add, self.is_expert = gather_output, skip_bias_add, is_expert
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)
        _check_collectives(self.tp_group, is_expert, column_parallel_kwargs.get("disable_grad_reduce", False))
        self.down = ReplicatedLinear(
            input_size,
            rank,
            config=config,
            init_method=init_method,
            bias=False,
            skip_bias_add=False,
            is_expert=is_expert,
            tp_group=self.tp_group,
        )
        self.up = ColumnParallelLinear(
            rank,
            output_size,
            config=config,
            init_method=init_method,
            bias=bias,
            gather_output=gather_output,
            skip_bias_add=skip_bias_add,
            is_expert=is_expert,
            tp_comm_buffer_name=tp_comm_buffer_name,
            tp_group=self.tp_group,
            **column_parallel_kwargs,
        )
        _mark_split(self.up.weight, dim=0, stride=self.stride)

    @property
    def bias(self) -> Optional[torch.nn.Parameter]:
        """The slot's bias (it lives on ``up``), where megatron's dense layer keeps it."""
        return self.up.bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """As megatron's, plus the gated-MLP layout of ``up``'s rows.

        In a gated fc1 (megatron passes stride=2) each rank's output rows are
        [gate_i; up_i]; megatron's MLP stores its dense fc1 weight in the global
        [gate; up] order so that it reshards across TP sizes, but it only knows the keys
        ``linear_fc1.weight`` / ``.bias``. ``up`` has the same row layout: same treatment.
        """
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.stride == 2:
            singleton = (metadata or {}).get("singleton_local_shards", False)
            groups = ({"tp_group": self.tp_group, "dp_group": ensure_metadata_has_dp_cp_group(metadata)["dp_cp_group"]}
                      if _SWIGLU_TAKES_GROUPS else {})
            for key in (f"{prefix}up.weight", f"{prefix}up.bias"):
                if key in sharded:
                    sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton, **groups)
        return sharded

    def forward(
        self, input_: torch.Tensor, runtime_gather_output: Optional[bool] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        # input_: [s, b, in]  (SP: [s/tp, b, in])
        z, _ = self.down(input_)  # [s, b, r] (SP: [s/tp, b, r]); local
        # up: SP off: identity fwd / all-reduce dz [s,b,r] bwd;
        #     SP on:  all-gather z -> [s,b,r] fwd / reduce-scatter dz bwd.
        return self.up(z, runtime_gather_output=runtime_gather_output)  # [s, b, out/tp]


class LowRankRowParallelLinear(MegatronModule):
    """Drop-in for ``RowParallelLinear``: row-parallel ``down`` (r x in), replicated ``up`` (out x r).

    The TP reduction happens on z [s,b,r] inside ``down`` instead of on y [s,b,out]; the
    bias lives on ``up`` and is added once, after the reduction.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        rank: int,
        config: ModelParallelConfig,
        init_method: Callable[[torch.Tensor], None],
        bias: bool,
        input_is_parallel: bool,
        skip_bias_add: bool,
        is_expert: bool = False,
        tp_comm_buffer_name: Optional[str] = None,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
        **row_parallel_kwargs,
    ) -> None:
        super().__init__(config=config)
        _check_rank(rank, output_size, input_size)
        self.input_size, self.output_size, self.rank = input_size, output_size, rank
        self.input_is_parallel, self.skip_bias_add, self.is_expert = input_is_parallel, skip_bias_add, is_expert
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)
        _check_collectives(self.tp_group, is_expert)
        self.down = RowParallelLinear(
            input_size,
            rank,
            config=config,
            init_method=init_method,
            bias=False,
            input_is_parallel=input_is_parallel,
            skip_bias_add=True,
            is_expert=is_expert,
            tp_comm_buffer_name=tp_comm_buffer_name,
            tp_group=self.tp_group,
            **row_parallel_kwargs,
        )
        _mark_split(self.down.weight, dim=1, stride=1)
        self.up = ReplicatedLinear(
            rank,
            output_size,
            config=config,
            init_method=init_method,
            bias=bias,
            skip_bias_add=skip_bias_add,
            is_expert=is_expert,
            tp_group=self.tp_group,
        )

    @property
    def bias(self) -> Optional[torch.nn.Parameter]:
        """The slot's bias (it lives on ``up``), where megatron's dense layer keeps it."""
        return self.up.bias

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        # input_: [s, b, in/tp]
        # down: SP off: all-reduce z [s,b,r] fwd / identity bwd;
        #       SP on:  reduce-scatter z -> [s/tp,b,r] fwd / all-gather dz bwd.
        z, _ = self.down(input_)
        return self.up(z)  # [s, b, out] (SP: [s/tp, b, out]); local


# slot kind (nemo_plrd.slots) -> its low-rank layer
LOW_RANK_LAYERS = {COLUMN: LowRankColumnParallelLinear, ROW: LowRankRowParallelLinear}
