"""``--model demo``, the command line's default: ``FAMILY`` declares the embedded demo model and its FDM (the demo
VQGAN is a taming ``VQModel``: the taming family's adapter drives it, and its loader needs the taming extra).
"""

from fdm.demo.model import load_demo_fdm, load_demo_vqgan
from fdm.registry import CliModel, ModelFamily

__all__ = ["FAMILY"]

FAMILY = ModelFamily(
    name="demo",
    adapters=(),
    extra="taming",
    cli_models={"demo": CliModel(lambda args: load_demo_vqgan(), default_fdm=load_demo_fdm)},
)
