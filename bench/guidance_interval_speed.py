"""Speed of guidance on part of the trajectory (bench/results/guidance_interval_cpu): the bundled
stack, dpmpp2m-sde8, the classifier on every step / on t <= 700 / on every 2nd call, alternating."""
import time, statistics, admrt, json
m = admrt.load_model("fashion16-cond"); c = admrt.load_model("fashion16-classifier")
eng = admrt.Engine(m, classifier=c, backend="eager")
variants = {"every step": {}, "interval 0..700": {"guidance_interval": (0, 700)}, "every 2nd call": {"guidance_every": 2}}
kw = dict(num=64, steps="dpmpp2m-sde8", guidance=1.0, seeds=0, batch_size=64)
for v in variants.values(): eng.sample(**kw, **v)  # warm
times = {k: [] for k in variants}
for _ in range(5):
    for k, v in variants.items():
        t = time.perf_counter(); eng.sample(**kw, **v); times[k].append(time.perf_counter() - t)
base = statistics.median(times["every step"])
for k, ts in times.items():
    med = statistics.median(ts)
    print(f"{k:16s} median {med*1e3:7.1f} ms [{min(ts)*1e3:.1f}, {max(ts)*1e3:.1f}] -> {64/med:6.1f} img/s, x{base/med:.2f}")
