"""Fixtures shared by the fault-injection modules (each defines its own module-scoped ``cluster``)."""

import pytest

from tests.integration.chat_client import reference_answers


@pytest.fixture(scope="module")
def answers(cluster) -> dict[str, tuple[str, str]]:
    """prompt -> (text, finish_reason) from the module's cluster before any fault."""
    return reference_answers(cluster.base_url)
