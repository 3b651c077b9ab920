"""The staged base handler and the small, separately testable stages of this project's TorchServe
handlers.

Family-neutral core: serving (StagedHandler: load, warm-up, timing, metrics, profiler switch,
out-of-memory splitting, per-request statuses; place_worker: device and threads), batching
(per-request errors and answers), oom, metrics, profiling, runtime (device, threads, safe weights,
runtimes, autocast), config (validators every family's schema uses), quantization (dynamic int8),
wire (payload fields), errors. One family each: vision, image_config, classification (image);
text, text_config (text); tabular, tabular_config (tabular).

The package travels inside every archive (the build script copies it next to the handler file),
so handlers import it by its top-level name both in the archive and in the tests.
"""
