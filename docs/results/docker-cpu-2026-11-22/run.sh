#!/usr/bin/env bash
# How these results were made (2-core CPU host, Docker 20.10.24 from Debian's docker.io, no NVIDIA runtime):
#   apt-get install -y docker.io debootstrap && dockerd --bridge=none --iptables=false &
# Images were already built by earlier runs (cold build times are in README.md here).
set -euo pipefail
nox -s matrix -- --runtime docker --trials 2 --out /tmp/dk/full --run-name docker-cpu
nox -s report -- docs/results/docker-cpu-2026-11-22
