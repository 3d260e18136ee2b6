# Source on the device machine from the repo root (carry .gpu): installs the SGLang wheelhouse into /tmp/site,
# lays the forkkv-patched server_args.py over it (.gpu/overlay, from this machine's patched .venv: the device has
# no `patch`), stages sglang_forkkv with its kernels and entry point (as `pip install` would lay them out) and
# exports PYTHONPATH.
# .gpu is built by `bash ../shared/gpu/wheelhouse.sh .gpu && bash bench/gpu/make_room.sh` (xgrammar replaced by a
# raise-on-use stand-in to fit the 64 MiB carry): start servers with --grammar-backend none (see make_room.sh).
eval "$(bash .gpu/device-setup.sh | tail -n1)"
cp .gpu/overlay/server_args.py /tmp/site/sglang/srt/server_args.py
FORKKV_STAGE=/tmp/forkkv-stage
rm -rf "$FORKKV_STAGE" && mkdir -p "$FORKKV_STAGE/sglang_forkkv-0.1.0.dist-info"
cp -r sglang_forkkv "$FORKKV_STAGE/" && cp -r kernels "$FORKKV_STAGE/sglang_forkkv/kernels"
printf 'Metadata-Version: 2.1\nName: sglang-forkkv\nVersion: 0.1.0\n' > "$FORKKV_STAGE/sglang_forkkv-0.1.0.dist-info/METADATA"
printf '[sglang.srt.plugins]\nforkkv = sglang_forkkv.plugin:load_plugin\n' \
  > "$FORKKV_STAGE/sglang_forkkv-0.1.0.dist-info/entry_points.txt"
export PYTHONPATH="$FORKKV_STAGE:$PYTHONPATH" PYTHONUNBUFFERED=1
