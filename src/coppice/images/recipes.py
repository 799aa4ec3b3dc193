"""Template recipes: what goes into an image. A recipe's content decides its cache key."""

from __future__ import annotations

from dataclasses import dataclass

from coppice.config import Limits
from coppice.errors import UnknownRecipe

# debootstrap does not resolve virtual packages, so the two providers that python3-zmq and
# ipykernel pull in through virtual names are listed explicitly; without them those packages
# are left unconfigured.
PYTHON_PACKAGES = (
    "python3",
    # `python` as well as `python3`, as E2B's images have (and agents type).
    "python-is-python3",
    "python3-ipykernel",
    "python3-cffi-backend",
    "libboost-regex1.74.0",
    "openssh-server",
    "iproute2",
    "procps",
)


@dataclass(frozen=True)
class Recipe:
    name: str
    substrate: str
    description: str
    suite: str = "bookworm"
    packages: tuple[str, ...] = ()
    #: None: the host's default limits (Settings.limits)
    limits: Limits | None = None
    #: other names the gateway accepts for this template (E2B's template ids)
    aliases: tuple[str, ...] = ()
    #: may the gateway start one on demand when the pool is empty (also needs the
    #: `cold_start` setting); False answers 429 instead, for templates too slow to boot
    cold_start: bool = True


RECIPES: dict[str, Recipe] = {
    "python": Recipe(
        name="python",
        substrate="jail",
        description="Debian bookworm with Python 3, ipykernel and sshd, as a jail",
        packages=PYTHON_PACKAGES,
        # E2B's SDKs ask for these by default (e2b and e2b-code-interpreter respectively).
        aliases=("base", "code-interpreter-v1"),
    ),
    "python-vm": Recipe(
        name="python-vm",
        substrate="vm",
        description="Debian bookworm with Python 3, ipykernel and sshd, as a QEMU microVM",
        packages=PYTHON_PACKAGES,
        # Booting under TCG takes seconds: serve only from the warm pool.
        cold_start=False,
    ),
}


def recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownRecipe(name, list(RECIPES)) from None
