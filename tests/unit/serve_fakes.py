"""Fakes of Ray Serve handles shared by the orchestrator's unit tests."""


class FakeResponse:
    """A fake Serve DeploymentResponse: awaitable, cancellable."""

    def __init__(self, coro):
        self._coro, self.cancelled = coro, False

    def __await__(self):
        return self._coro.__await__()

    def cancel(self):
        self.cancelled = True


class FakeHandleBase:
    """A fake Serve deployment handle of a pool: ``.prefill.remote`` and ``.options(stream=True).generate.remote``
    both reach ``remote(req, endpoint_hint)``, which subclasses implement."""

    @property
    def prefill(self):
        return self

    @property
    def generate(self):
        return self

    def options(self, stream):
        return self

    def remote(self, req, endpoint_hint):
        raise NotImplementedError
