"""Rolling golden-image deployments with image prefetch (see ``rollout.Rollout``)."""

from nomadscale.deploy.image import ImageRef, parse_image
from nomadscale.deploy.prefetch import PrefetchResult, prefetch, warm_up_new_nodes
from nomadscale.deploy.rollout import Rollout
from nomadscale.deploy.state import RolloutState, StateStore

__all__ = [
    "ImageRef",
    "PrefetchResult",
    "Rollout",
    "RolloutState",
    "StateStore",
    "parse_image",
    "prefetch",
    "warm_up_new_nodes",
]
