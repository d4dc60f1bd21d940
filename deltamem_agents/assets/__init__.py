"""Files shipped with the package, not code: trained adapters under ``adapters/<name>/`` (see
:mod:`deltamem_agents.adapter.shipped`)."""

__all__: list[str] = []
