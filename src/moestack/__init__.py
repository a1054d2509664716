"""moestack: multi-tenant serving of open-weight Mixture-of-Experts LLMs on Ray Serve and vLLM."""

from moestack.config import MoestackConfig, load_config
from moestack.errors import MoestackError

__version__ = "0.1.0"

__all__ = ["MoestackConfig", "MoestackError", "__version__", "load_config"]
