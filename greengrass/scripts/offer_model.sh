#!/bin/sh
# Offer this model component's bundle to the qcsight agent and wait for its verdict.
#
# Usage: offer_model.sh BUNDLE SLOT [WAIT_S]
#   BUNDLE  the unpacked bundle folder ({artifacts:decompressedPath}/bundle)
#   SLOT    the folder the agent watches ({work:path} of com.qcsight.Model)
#   WAIT_S  how long to wait for the agent's verdict (default 100; the step's Timeout is longer)
#
# The protocol is described in qcsight_edge/model_slot.py. Exit 0: the running agent swapped the
# bundle in, or no agent runs yet (it loads the offer when it starts, and fails to start if it
# cannot). Exit 1: the agent refused the bundle (its reason goes to stderr, hence to the
# component's log and the deployment's failure) or did not answer in time.
set -eu

bundle=$1
slot=$2
wait_s=${3:-100}

if [ ! -f "$bundle/manifest.json" ]; then
    echo "qcsight: $bundle holds no manifest.json: not a model bundle" >&2
    exit 1
fi
mkdir -p "$slot"
nonce="$$-$(date +%s)-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')"
printf '%s\n%s\n' "$bundle" "$nonce" > "$slot/.offer.$$"
mv -f "$slot/.offer.$$" "$slot/offer"

pid=$(cat "$slot/agent.pid" 2>/dev/null || true)
if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    echo "qcsight: offered $bundle; no agent is running, it loads the offer when it starts"
    exit 0
fi

deadline=$(( $(date +%s) + wait_s ))
while [ "$(date +%s)" -lt "$deadline" ]; do
    verdict=$(head -n 1 "$slot/answer" 2>/dev/null || true)
    if [ "$verdict" = "accepted $nonce" ]; then
        echo "qcsight: the agent swapped in $bundle"
        exit 0
    fi
    if [ "$verdict" = "rejected $nonce" ]; then
        echo "qcsight: the agent refused $bundle: $(tail -n +3 "$slot/answer")" >&2
        exit 1
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "qcsight: offered $bundle; the agent stopped, it loads the offer when it starts"
        exit 0
    fi
    sleep 0.2
done
echo "qcsight: the agent (pid $pid) did not answer the offer of $bundle within $wait_s s" >&2
exit 1
