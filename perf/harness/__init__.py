"""What every benchmark and report in perf/ shares, so that each is defined once:

- ``models``: the weight formats and their configs, the synthetic workloads, Qwen2 and SmolLM2;
- ``timing``: the interleaved minimum-of-rounds loop, guard counting, progress lines;
- ``decode``: the library's decode step (``subclasses.decode``) run one token per call, per mode;
- ``tables``: the Markdown table writer and the stamp of machine, threads, torch, date and command.
"""
