"""How N ranks share one denoising step: the guidance batch, then the token sequence.

Classifier-free guidance runs the transformer on a batch of two (negative and positive
prompt) whose halves never interact: splitting it over two ranks costs one gather of the
noise prediction per step, the cheapest split there is, so it comes first. The remaining
factor splits the token sequence (Ulysses attention: four all-to-alls per attention layer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    cfg: int  # 1 or 2: ranks that split the classifier-free-guidance batch
    ulysses: int  # ranks that split the token sequence (Ulysses attention)

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses

    def __str__(self) -> str:
        parts = [f"CFG-{self.cfg}"] if self.cfg > 1 else []
        parts += [f"Ulysses-{self.ulysses}"] if self.ulysses > 1 else []
        return " x ".join(parts) or "single process"


def choose_layout(
    world_size: int, classifier_free_guidance: bool, heads: int | None = None
) -> Layout:
    """The layout for `world_size` ranks: CFG-2 when there is guidance, Ulysses for the rest.

    1 -> single; 2 -> CFG-2 (Ulysses-2 without guidance); 4 -> CFG-2 x Ulysses-2;
    8 -> CFG-2 x Ulysses-4. Other counts get the largest layout whose size divides them; the
    remaining ranks repeat the same work (replicas, which replica_warnings reports). `heads`,
    the transformer's attention heads, bounds Ulysses: each rank computes whole heads, so the
    degree must divide it (2B has 30).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, not {world_size}")
    candidates = [
        Layout(cfg=cfg, ulysses=ulysses)
        for cfg in ((2, 1) if classifier_free_guidance else (1,))
        for ulysses in range(world_size // cfg, 0, -1)
        if world_size % (cfg * ulysses) == 0 and (heads is None or heads % ulysses == 0)
    ]
    # The most ranks at work; among equals, the CFG split (the cheaper communication).
    return max(candidates, key=lambda layout: (layout.world_size, layout.cfg))


def replica_warnings(world_size: int, layouts: Iterable[Layout]) -> list[str]:
    """What to tell the operator, once per distinct layout, about ranks that only repeat
    its work: the two guidance layouts are often the same one."""
    return [
        f"{world_size} ranks: layout {layout} uses {layout.world_size}; the other "
        f"{world_size - layout.world_size} compute the same video as replicas, no faster"
        for layout in dict.fromkeys(layouts)
        if layout.world_size < world_size
    ]
