"""The TLS context of Modbus/TCP Security, built from [modbus] tls_cert, tls_key and tls_client_ca.

One function for the server and for the configuration check (check-config and run refuse the same
files): any file that cannot be used is a ConfigError naming its key, the path and why. Each file is
first read on its own, so the error names the file that is wrong rather than "PEM lib" for the pair.
"""

from __future__ import annotations

import ssl

from smallbms_bus.config import ConfigError


def _readable(key: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise ConfigError(key, path, f"a readable PEM file ({error.strerror})") from None
    except ValueError:  # an embedded NUL
        raise ConfigError(key, path, "a file path") from None


def _no_password() -> bytes:
    """An encrypted key fails at once instead of OpenSSL asking for a pass phrase on the terminal."""
    return b""


def tls_context(cert: str, key: str | None, client_ca: str | None, section: str = "modbus") -> ssl.SSLContext:
    """A server context (client certificates optional: readers need none, writers do when client_ca is set).
    Without `key` the private key is read from the certificate's file. `section` names the keys in errors
    ([web] uses the same options)."""
    for name, path in ((f"{section}.tls_cert", cert), (f"{section}.tls_key", key),
                       (f"{section}.tls_client_ca", client_ca)):
        if path is not None:
            _readable(name, path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=cert)
    except ssl.SSLError as error:
        raise ConfigError(f"{section}.tls_cert", cert, f"a PEM certificate ({error.reason or error})") from None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as error:
        why = (f"it does not match {section}.tls_cert" if error.reason == "KEY_VALUES_MISMATCH"
               else error.reason or error)
        raise ConfigError(f"{section}.tls_key", key or cert,
                          f"the unencrypted PEM private key of {section}.tls_cert ({why})") from None
    if client_ca:
        try:
            ctx.load_verify_locations(client_ca)
        except ssl.SSLError as error:
            raise ConfigError("modbus.tls_client_ca", client_ca,
                              f"a PEM file of CA certificates ({error.reason or error})") from None
        ctx.verify_mode = ssl.CERT_OPTIONAL  # readers need no certificate; writers do
    return ctx
