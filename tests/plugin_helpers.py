"""Helpers for tests that drive a scheduler plugin instance directly."""

from __future__ import annotations


async def add_plugin(s, plugin):
    """Install ``plugin`` itself (not a pickled copy) on scheduler ``s`` so tests can inspect it."""
    s.add_plugin(plugin)
    await plugin.start(s)
    return plugin
