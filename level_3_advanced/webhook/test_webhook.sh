#!/usr/bin/env bash
# curl examples against a running receiver: a valid webhook, a duplicate, a bad body, a bad
# signature, a stale timestamp. Each prints its HTTP status code and the JSON answer.
#
#   export WEBHOOK_SECRET=whsec_$(head -c 32 /dev/urandom | base64)
#   python -m level_3_advanced.webhook.webhook_server --server waitress &   # same secret
#   bash level_3_advanced/webhook/test_webhook.sh
#
# The headers are signed by the sender module (--print-headers), so curl sends exactly the
# bytes that were signed. Settings: WEBHOOK_URL, WEBHOOK_SECRET, PYTHON.
set -euo pipefail

URL="${WEBHOOK_URL:-http://127.0.0.1:5000/webhook/order}"
PYTHON="${PYTHON:-python}"
: "${WEBHOOK_SECRET:?set WEBHOOK_SECRET to the secret the server was started with}"
ORDER_ID=$(( (RANDOM << 15 | RANDOM) + 1 ))
MSG_ID="msg_sh_${ORDER_ID}_$$"

sign() {  # sign <secret> <msg-id> <body> [timestamp] -> three "name: value" lines
    "$PYTHON" -m level_3_advanced.webhook.sign --print-headers --secret "$1" --id "$2" \
        ${4:+--timestamp "$4"} "$3"
}

post() {  # post <label> <body> <header lines...>
    local label="$1" body="$2"
    shift 2
    local args=()
    local line
    for line in "$@"; do args+=(-H "$line"); done
    local answer
    answer=$(curl -sS -o - -w ' %{http_code}' -X POST "$URL" \
        -H 'Content-Type: application/json' "${args[@]}" --data-binary "$body")
    printf '%-28s -> %s %s\n' "$label" "${answer##* }" "${answer% *}"
}

BODY="{\"order_id\": ${ORDER_ID}, \"status\": \"created\"}"

mapfile -t HEADERS < <(sign "$WEBHOOK_SECRET" "$MSG_ID" "$BODY")
post "valid webhook" "$BODY" "${HEADERS[@]}"                       # 202

mapfile -t HEADERS < <(sign "$WEBHOOK_SECRET" "$MSG_ID" "$BODY")
post "duplicate (same webhook-id)" "$BODY" "${HEADERS[@]}"         # 200, same event_id

BAD='{"order_id": -1, "status": "lost"}'
mapfile -t HEADERS < <(sign "$WEBHOOK_SECRET" "${MSG_ID}_bad" "$BAD")
post "bad body" "$BAD" "${HEADERS[@]}"                             # 400

WRONG="whsec_$(printf 'not-the-right-secret-0123456789' | base64)"
mapfile -t HEADERS < <(sign "$WRONG" "${MSG_ID}_sig" "$BODY")
post "bad signature" "$BODY" "${HEADERS[@]}"                       # 401

mapfile -t HEADERS < <(sign "$WEBHOOK_SECRET" "${MSG_ID}_old" "$BODY" "$(( $(date +%s) - 600 ))")
post "stale timestamp (10 min)" "$BODY" "${HEADERS[@]}"            # 401
