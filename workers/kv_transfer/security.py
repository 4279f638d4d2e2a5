"""Authentication and encryption of the KV channel: a shared token on every RPC, TLS by configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from workers.kv_transfer.errors import TransferAuthError

TOKEN_METADATA_KEY = "x-tandem-kv-token"
TOKEN_ENV_VAR = "TANDEM_KV_TOKEN"
ERROR_METADATA_KEY = "tandem-error"  # trailing metadata naming the typed error class
SERVICE_NAME = "tandem.kv.v1.KVTransfer"


def token_from_env(var: str = TOKEN_ENV_VAR) -> str:
    """The shared token from the environment; TransferAuthError when it is unset or empty."""
    tok = os.environ.get(var, "")
    if not tok:
        raise TransferAuthError(f"set {var} to the KV channel's shared token (same value on prefill and decode)")
    return tok


def check_token(token: str) -> str:
    if not isinstance(token, str) or len(token) < 8:
        raise TransferAuthError("auth_token must be a string of at least 8 characters")
    return token


@dataclass(frozen=True)
class TLSConfig:
    """PEM files for TLS. The server uses cert_chain + private_key; the client trusts root_ca.

    server_name_override: the name the client checks in the server certificate (e.g. "localhost"
    when the certificate is issued for that name and the target is 127.0.0.1).
    """

    cert_chain_path: Path | None = None
    private_key_path: Path | None = None
    root_ca_path: Path | None = None
    server_name_override: str | None = None

    def server_credentials(self):  # -> grpc.ServerCredentials
        import grpc

        if self.cert_chain_path is None or self.private_key_path is None:
            raise ValueError("TLS server needs cert_chain_path and private_key_path")
        key = Path(self.private_key_path).read_bytes()
        chain = Path(self.cert_chain_path).read_bytes()
        return grpc.ssl_server_credentials([(key, chain)])

    def channel_credentials(self):  # -> grpc.ChannelCredentials
        import grpc

        root = Path(self.root_ca_path).read_bytes() if self.root_ca_path is not None else None
        return grpc.ssl_channel_credentials(root_certificates=root)
