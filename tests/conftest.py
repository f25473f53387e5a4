import torch

# The suite runs on 2 shared cores: one thread per test process keeps timings stable and avoids oversubscription.
torch.set_num_threads(1)
