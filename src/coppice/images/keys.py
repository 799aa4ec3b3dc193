"""SSH keys: the pool's client keypair (made once) and per-entry host keys (made at warm)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


@dataclass(frozen=True)
class Keypair:
    private_openssh: bytes
    public_openssh: str


def generate_ed25519(comment: str) -> Keypair:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return Keypair(private, f"{public.decode()} {comment}")


@dataclass(frozen=True)
class PoolKey:
    """The ed25519 keypair whose public half every template trusts for root."""

    private_path: Path

    @property
    def public_path(self) -> Path:
        return self.private_path.with_suffix(".pub")

    @property
    def public_openssh(self) -> str:
        return self.public_path.read_text().strip()

    @classmethod
    def at(cls, keys_dir: Path) -> PoolKey:
        return cls(keys_dir / "pool_ed25519")

    def ssh_argv(self, ip: str, *command: str, batch: bool = False) -> list[str]:
        """ssh(1) as root into a sandbox with this key. Host keys are per entry and addresses
        are reused, so there is no stable host key to pin: checking is off on purpose."""
        options = ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"]
        if batch:
            options += ["BatchMode=yes", "ConnectTimeout=10"]
        argv = ["ssh", "-i", str(self.private_path)]
        for option in options:
            argv += ["-o", option]
        return [*argv, f"root@{ip}", *command]

    def exists(self) -> bool:
        return self.private_path.exists() and self.public_path.exists()

    def ensure(self) -> PoolKey:
        if self.exists():
            return self
        self.private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pair = generate_ed25519("coppice-pool")
        # Write to a temporary name then rename: two concurrent first builds cannot leave a
        # private key that does not match its public half.
        tmp = self.private_path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pair.private_openssh)
        tmp_pub = self.public_path.with_suffix(f".pub.tmp{os.getpid()}")
        tmp_pub.write_text(pair.public_openssh + "\n")
        try:
            os.link(tmp, self.private_path)
            tmp_pub.replace(self.public_path)
        except FileExistsError:
            tmp_pub.unlink()
        finally:
            tmp.unlink()
        return self
