"""What the network tells us, for every reader of remote files (the Hub, byte-range streams):
whether the Hub is switched off, and whether a failure is the transport's (worth retrying)."""

import os


def hub_offline() -> bool:
  """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now."""
  from huggingface_hub import constants

  # The env var is read again here: huggingface_hub reads it only once, at import.
  env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
  return constants.HF_HUB_OFFLINE or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


# Transport failures of the HTTP clients underneath (httpx for huggingface_hub, aiohttp for
# fsspec), recognised by class name so that neither client has to be imported.
_TRANSPORT_ERROR_NAMES = frozenset(
  {
    "TransportError",
    "TimeoutException",
    "NetworkError",
    "ConnectError",
    "RemoteProtocolError",
    "ReadError",
    "ClientError",
    "ServerDisconnectedError",
  }
)


def is_transport_error(error: BaseException) -> bool:
  """Whether `error` is an HTTP client's transport failure (worth retrying)."""
  return any(cls.__name__ in _TRANSPORT_ERROR_NAMES for cls in type(error).__mro__)
