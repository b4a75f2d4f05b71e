# Shell functions shared by the scripts that build mixkv's optional virtual environments
# (kvpress: src/mixkv/lab/compare/kvpress/setup_env.sh; lmms-eval: scripts/lmms_env.sh;
# vLLM: scripts/vllm_env.sh). Source it after defining `say` (a tagged echo) and `VENV`.

# A literal "~" in a path variable, as Python's expanduser() reads it (quotes on purpose).
# shellcheck disable=SC2088
expand_home() { local p="$1"; [[ "$p" == "~" || "$p" == "~/"* ]] && p="$HOME${p:1}"; echo "$p"; }

pip_install() {
    # pip_install LOG ARGS...: quiet install into $VENV; on failure show the log's tail and stop.
    local log="$1"; shift
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        say "error: pip install $* failed (full log: $log)" >&2
        exit 1
    fi
    local new
    new="$(sed -n 's/^Successfully installed //p' "$log")"
    say "pip installed into the venv: ${new:-nothing new}"
}
