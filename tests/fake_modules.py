"""Stand-ins for modules a checkpoint may name but that are not installed."""
import sys
import types


def install_fake_yacs(monkeypatch, cfg_node_class):
    """Make `cfg_node_class` importable as yacs.config.CfgNode, so that pickles of its instances name the
    class a real training checkpoint names (yacs is not installed)."""
    package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    cfg_node_class.__module__, cfg_node_class.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode, package.config = cfg_node_class, module
    monkeypatch.setitem(sys.modules, "yacs", package)
    monkeypatch.setitem(sys.modules, "yacs.config", module)
