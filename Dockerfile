# fr_dist on an official PyTorch CUDA runtime image, with the DALI and DeepSpeed extras.
#
#   docker build -t fr_dist .
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.9-cudnn9-runtime -t fr_dist .
#
#   # single process (entry point = fr-dist)
#   docker run --rm --gpus all --ipc=host -v $PWD/data:/workspace/fr_dist/data -v $PWD/runs:/workspace/fr_dist/runs \
#       fr_dist train --config configs/ms1mv3_r50_sf2.yaml
#   # 8 GPUs: torchrun as the entry point
#   docker run --rm --gpus all --ipc=host -v ... --entrypoint torchrun fr_dist \
#       --standalone --nproc-per-node=8 -m fr_dist.cli train --config configs/ms1mv3_r50_sf2.yaml
#   # or the launch scripts: --entrypoint launch/torchrun_single.sh fr_dist 8 --config ...
#
# --ipc=host (or a large --shm-size) is needed by the DataLoader workers' shared memory.
# torch is NOT reinstalled: the image's own build is pinned through a pip constraint, so the
# CUDA/cuDNN/NCCL stack of the base image is the one that runs.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=https://pypi.nvidia.com

WORKDIR /workspace/fr_dist

# 1) dependencies only (a layer that survives code changes): read them from pyproject.toml
COPY pyproject.toml /tmp/fr_dist/pyproject.toml
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
 && python -c "import tomllib; p = tomllib.load(open('/tmp/fr_dist/pyproject.toml', 'rb'))['project']; x = p['optional-dependencies']; print('\n'.join(p['dependencies'] + x['dali'] + x['deepspeed']))" > /tmp/requirements.txt \
 && cat /tmp/torch-constraint.txt /tmp/requirements.txt \
 && pip install -c /tmp/torch-constraint.txt -r /tmp/requirements.txt

# 2) fr_dist itself with its extras (resolved again under the same torch constraint: no-op
#    for what step 1 installed, and never a different torch)
COPY . .
RUN pip install -c /tmp/torch-constraint.txt ".[dali,deepspeed]" \
 && python -c "import torch, fr_dist; print('fr_dist', fr_dist.__file__, 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && fr-dist --help > /dev/null

ENTRYPOINT ["fr-dist"]
CMD ["--help"]
