"""The seed's LLM Manager (``from llm_manager import X`` becomes ``from engine import X``).

Pure compute and models: imports no platform library, no database and no ``memory``.
"""

from engine.errors import EngineError, ModelLoadError, ModelNotFoundError
from engine.llm_manager import LLMManager, create_llm_manager
from engine.system_info import diagnose_system, get_module_info, get_system_info

__all__ = [
    "EngineError",
    "LLMManager",
    "ModelLoadError",
    "ModelNotFoundError",
    "create_llm_manager",
    "diagnose_system",
    "get_module_info",
    "get_system_info",
]
