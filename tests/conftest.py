"""Shared fixtures. The bus used by integration tests comes from SMALLBMS_TEST_BUS (see tests/transports.py)."""

from __future__ import annotations

import pytest

from smallbms_bus.link.codec import FrameDecoder, FrameEncoder, load_dbc


@pytest.fixture(scope="session")
def dbc():
    return load_dbc()


@pytest.fixture
def decoder(dbc) -> FrameDecoder:
    return FrameDecoder(dbc)


@pytest.fixture(scope="session")
def encoder(dbc) -> FrameEncoder:
    return FrameEncoder(dbc)
