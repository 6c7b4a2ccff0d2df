"""An example benchmark: times a small sort and writes its metrics where dtf asks ($DTF_METRICS).
The task's config (model, batch_size, ...) arrives as DTF_CONFIG_<KEY> variables and becomes labels."""

import json
import os
import random
import time

batch = int(os.environ.get("DTF_CONFIG_BATCH_SIZE", "8"))
data = [random.random() for _ in range(20_000 * batch)]
start = time.perf_counter()
data.sort()
elapsed = time.perf_counter() - start
metrics = {"sort_seconds": elapsed, "items_per_second": len(data) / elapsed}
with open(os.environ["DTF_METRICS"], "w") as out:
    json.dump(metrics, out)
print(json.dumps(metrics))
