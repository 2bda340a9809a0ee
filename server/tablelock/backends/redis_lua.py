"""The Redis side's scripts: storage, ordering and numbering only, never a lock rule.

Every script touches the keys of one store (one hash tag, so one Cluster slot)
and reads the Redis server's clock itself. `COMMIT` is a compare-and-set of
one order's record, decided by `rules.step` in Python: it refuses when the
record or the store state moved since the broker read them, or when the time
the broker stepped at is not within `tolerance` before Redis's own clock, and
then hands back the fresh values so the broker can step again.

Every commit carries an id, written down with its order (the order's commit log,
a sorted set by Redis time) when it applies. A broker that lost a commit's reply
asks `RESOLVE` whether it applied; an id not found is marked void there, so
that the commit, still on its way or buffered in a stalled Redis, can never
apply afterwards: the answer is final either way.
"""

from __future__ import annotations

# Shared by the scripts that publish: number an event on a channel, keep it in the
# channel's bounded history, and add it to the message for that channel's brokers. Bodies
# are opaque here: the broker builds the frame (protocol.numbered_frame), never Lua.
_EMIT = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- A channel's numbering starts from the clock (see backends.base.first_seq).
local function seq_of(seq_key, channel)
  local seq = redis.call('HGET', seq_key, channel)
  if seq then return seq end
  seq = string.format('%d', now_ms() * 1000)
  redis.call('HSET', seq_key, channel, seq)
  return seq
end
-- body: an opaque event body (protocol.event_body), numbered here, framed by the broker
local function emit(out, seq_key, hist_key, channel, body, table_id, maxlen)
  seq_of(seq_key, channel)
  -- seqs pass 2^31: format them as integers, never let Lua or cjson write 1.7e+15
  local seq = string.format('%d', redis.call('HINCRBY', seq_key, channel, 1))
  redis.call('XADD', hist_key, 'MAXLEN', '~', maxlen, seq .. '-0', 'b', body, 't', table_id)
  out[#out + 1] = {0, channel, seq, table_id, '', '', body}
end
-- A message for the brokers listening on `pubsub` (PUBLISH, or SPUBLISH on a Cluster): a
-- JSON header, a newline, then the bodies as they are, each entry's at [start, stop) of
-- them. Bodies are never escaped into the JSON, nor decoded by a broker that only passes
-- them on; a body two entries share in a row (an order's and its store's) is sent once.
local function send(command, pubsub, out)
  if #out == 0 then return end
  local heads, bodies, stop, last = {}, {}, 0, nil
  for n, entry in ipairs(out) do
    local body = entry[7]
    if body ~= last then
      bodies[#bodies + 1] = body
      stop = stop + #body
      last = body
    end
    heads[n] = {entry[1], entry[2], entry[3], entry[4], entry[5], entry[6], stop - #body, stop}
  end
  redis.call(command, pubsub, cjson.encode(heads) .. '\\n' .. table.concat(bodies))
end
-- The numbering's epoch, a field of the seqs hash ('epoch' is no channel's name: those are
-- store:... and order:...), made from `fresh` if Redis has none (a new or a lost hash).
local function epoch_of(seq_key, fresh)
  redis.call('HSETNX', seq_key, 'epoch', fresh)
  return redis.call('HGET', seq_key, 'epoch')
end
local function bump(key)
  local old = tonumber(redis.call('HGET', key, 'rev') or '0')
  local new = math.max(old + 1, now_us())
  redis.call('HSET', key, 'rev', string.format('%d', new))
end
"""

# KEYS: 1 record, 2 store state, 3 seqs, 4 deadlines, 5 order ids, 6 order history,
#       7 store history, 8 audit, 9 unhandled audit, 10 unhandled count per terminal,
#       11 the order ids of the table the record had, 12 those of the table it has now,
#       13 the order's commit log, [14 global due-stores, not in Cluster]
# ARGV: 1 record rev seen, 2 state rev seen, 3 now stepped at, 4 tolerance ms,
#       5 record op (keep|set|del), 6 record bytes, 7 deadline or '', 8 order id, 9 store id,
#       10 order channel, 11 its pub/sub channel, 12 store channel, 13 its pub/sub channel,
#       14 key prefix of the brokers holding a terminal (+ holder key), 15 history maxlen,
#       16 audit maxlen, 17 event count, 18 direct count, 19 audit count,
#       20 unhandled entries kept per terminal, 21 table the record had ('' none),
#       22 table it has now ('' none), 23 commit id ('' for one that changes nothing:
#       a read), 24 how long the commit log keeps ids (ms), 25 PUBLISH or SPUBLISH,
#       26 pub/sub channel prefix of one broker's direct notices (+ broker id),
#       then per event (body, table_id, notify, direct body), per direct (terminal, body,
#       coalescing key), per audit entry (json, terminal to keep it unhandled for or '',
#       json to log instead when that terminal has its fill of unhandled entries)
COMMIT = _EMIT + """
local real = now_ms()
-- Sent once only; an id already known was applied, or voided by RESOLVE: never apply it now.
-- A commit that writes nothing of its own has no id ('').
local commit_id = ARGV[23]
if commit_id ~= '' and (redis.call('ZSCORE', KEYS[13], commit_id)
                        or redis.call('ZSCORE', KEYS[13], 'v' .. commit_id)) then
  return {2, real}
end
local rec_rev = redis.call('HGET', KEYS[1], 'rev') or '0'
local state_rev = redis.call('HGET', KEYS[2], 'rev') or '0'
local stepped = tonumber(ARGV[3])
if rec_rev ~= ARGV[1] or state_rev ~= ARGV[2] or stepped > real
   or stepped < real - tonumber(ARGV[4]) then
  return {0, real, rec_rev, redis.call('HGET', KEYS[1], 'rec') or false,
          redis.call('HGETALL', KEYS[2])}
end
local op = ARGV[5]
local order_id = ARGV[8]
if op == 'set' then
  redis.call('HSET', KEYS[1], 'rec', ARGV[6])
  bump(KEYS[1])
  redis.call('SADD', KEYS[5], order_id)
elseif op == 'del' then
  redis.call('DEL', KEYS[1], KEYS[6])
  redis.call('SREM', KEYS[5], order_id)
  redis.call('HDEL', KEYS[3], ARGV[10])  -- its numbering goes with the order
end
if op ~= 'keep' and ARGV[21] ~= ARGV[22] then  -- the table index follows the record
  if ARGV[21] ~= '' then redis.call('SREM', KEYS[11], order_id) end
  if ARGV[22] ~= '' then redis.call('SADD', KEYS[12], order_id) end
end
local deadline = ARGV[7]
if deadline == '' or op == 'del' then
  redis.call('ZREM', KEYS[4], order_id)
else
  redis.call('ZADD', KEYS[4], deadline, order_id)
  if KEYS[14] then redis.call('ZADD', KEYS[14], 'LT', deadline, ARGV[9]) end
end
if commit_id ~= '' then
  redis.call('ZADD', KEYS[13], real, commit_id)
  redis.call('ZREMRANGEBYSCORE', KEYS[13], '-inf', real - tonumber(ARGV[24]))
  redis.call('PEXPIRE', KEYS[13], ARGV[24])
end
local order_out, store_out = {}, {}
-- Direct notices go only to the brokers that hold a connection of their terminal.
local by_broker, brokers = {}, {}
local function direct(holder, entry)
  for _, broker in ipairs(redis.call('SMEMBERS', ARGV[14] .. holder)) do
    if not by_broker[broker] then
      by_broker[broker] = {}
      brokers[#brokers + 1] = broker
    end
    table.insert(by_broker[broker], entry)
  end
end
local maxlen = ARGV[15]
local i = 27
for _ = 1, tonumber(ARGV[17]) do
  local body, table_id, notify, notice = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  emit(order_out, KEYS[3], KEYS[6], ARGV[10], body, table_id, maxlen)
  -- The store's message carries the order channel's numbering too: a broker that hears
  -- the store hears every order of it, without a subscription per order.
  store_out[#store_out + 1] = order_out[#order_out]
  emit(store_out, KEYS[3], KEYS[7], ARGV[12], body, table_id, maxlen)
  if notify ~= '' then
    direct(notify, {1, '', '0', table_id, notify, ARGV[10] .. '\\n' .. ARGV[12], notice})
  end
  i = i + 4
end
for _ = 1, tonumber(ARGV[18]) do
  direct(ARGV[i], {1, ARGV[i + 2], '0', '', ARGV[i], '', ARGV[i + 1]})
  i = i + 3
end
for _ = 1, tonumber(ARGV[19]) do
  local entry, pin = ARGV[i], ARGV[i + 1]
  if pin ~= '' and tonumber(redis.call('HGET', KEYS[10], pin) or '0') >= tonumber(ARGV[20]) then
    entry, pin = ARGV[i + 2], ''
  end
  local id = redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[16], '*', 'e', entry)
  if pin ~= '' then
    redis.call('HSET', KEYS[9], id, entry)
    redis.call('HINCRBY', KEYS[10], pin, 1)
  end
  i = i + 3
end
send(ARGV[25], ARGV[11], order_out)
send(ARGV[25], ARGV[13], store_out)
for _, broker in ipairs(brokers) do send(ARGV[25], ARGV[26] .. broker, by_broker[broker]) end
return {1, real, redis.call('HGET', KEYS[1], 'rev') or '0'}
"""

# Whether a commit whose reply was lost applied: 'applied', else 'void' (and from now on it
# never will: COMMIT refuses an id voided here).
# KEYS: 1 the order's commit log   ARGV: 1 commit id, 2 how long the log keeps ids (ms)
RESOLVE = _EMIT + """
-- Applied: touch the log (a write), so that a WAIT on this connection covers the commit too.
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 'applied'
end
local real = now_ms()
redis.call('ZADD', KEYS[1], real, 'v' .. ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', real - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 'void'
"""

# Read an order's record and its store's state at once (a cache miss).
# KEYS: 1 record, 2 store state
LOAD = _EMIT + """
return {now_ms(), redis.call('HGET', KEYS[1], 'rev') or '0',
        redis.call('HGET', KEYS[1], 'rec') or false, redis.call('HGETALL', KEYS[2])}
"""

# KEYS: 1 seqs, 2 store history
# ARGV: 1 store channel, 2 body, 3 its pub/sub channel, 4 maxlen, 5 PUBLISH or SPUBLISH
PUBLISH_STORE = _EMIT + """
local out = {}
emit(out, KEYS[1], KEYS[2], ARGV[1], ARGV[2], '', ARGV[4])
send(ARGV[5], ARGV[3], out)
return 1
"""

# KEYS: 1 store state   ARGV: 1 config JSON, 2 the store's config pub/sub channel,
#                               3 PUBLISH or SPUBLISH
# Bumps the state's revision, and tells the store's brokers: cached copies die.
PUT_CONFIG = _EMIT + """
redis.call('HSET', KEYS[1], 'config', ARGV[1])
bump(KEYS[1])
redis.call(ARGV[3], ARGV[2], '')
return 1
"""

# Presence of one terminal through one broker, set idempotently (a broker re-announces all
# of its connections after losing Redis). Online and offline are published on transitions;
# an ERP's offline time goes into the store state, which the rules read for the grace.
# KEYS: 1 state, 2 online terminals, 3 connections per terminal|broker, 4 authorities,
#       5 seqs, 6 store history, 7 the brokers holding the terminal (direct notices)
# ARGV: 1 holder key (role:sub), 2 broker id, 3 connection count, 4 terminal JSON, 5 role,
#       6 authority 0|1, 7 store channel, 8 the terminal.online body, 9 its pub/sub,
#       10 maxlen, 11 offline since ('' for now), 12 its locks have the disconnect grace
#       0|1, 13 the terminal.offline body, 14 PUBLISH or SPUBLISH
PRESENCE = _EMIT + """
local tid, broker = ARGV[1], ARGV[2]
local function total()
  local sum = 0
  local fields = redis.call('HGETALL', KEYS[3])
  for j = 1, #fields, 2 do
    local f = fields[j]
    if string.sub(f, 1, #tid + 1) == tid .. '|' and string.find(f, '|', #tid + 2, true) == nil then
      sum = sum + tonumber(fields[j + 1])
    end
  end
  return sum
end
local before = total()
local field = tid .. '|' .. broker
local count = tonumber(ARGV[3])
if count > 0 then
  redis.call('HSET', KEYS[3], field, count)
  redis.call('SADD', KEYS[7], broker)
else
  redis.call('HDEL', KEYS[3], field)
  redis.call('SREM', KEYS[7], broker)
end
if count > 0 and ARGV[6] == '1' then
  redis.call('HSET', KEYS[4], field, ARGV[5])
else
  redis.call('HDEL', KEYS[4], field)
end
local after = total()
local out = {}
local now = now_ms()
if before == 0 and after > 0 then
  redis.call('HSET', KEYS[2], tid, ARGV[4])
  if redis.call('HDEL', KEYS[1], 'off:' .. tid) == 1 then bump(KEYS[1]) end
  emit(out, KEYS[5], KEYS[6], ARGV[7], ARGV[8], '', ARGV[10])
elseif before > 0 and after == 0 then
  redis.call('HDEL', KEYS[2], tid)
  if ARGV[12] == '1' then
    local since = ARGV[11]
    if since == '' then since = tostring(now) end
    redis.call('HSET', KEYS[1], 'off:' .. tid, since)
    bump(KEYS[1])
  end
  emit(out, KEYS[5], KEYS[6], ARGV[7], ARGV[13], '', ARGV[10])
end
send(ARGV[14], ARGV[9], out)
return {before, after}
"""

# Mark an unhandled entry handled: it leaves the unhandled set, and its terminal's count.
# KEYS: 1 unhandled audit, 2 unhandled count per terminal   ARGV: 1 entry id
MARK_HANDLED = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local who = cjson.decode(raw).terminal
local pin = '|'
if type(who) == 'table' then pin = who.role .. '|' .. who.terminal_id end
if redis.call('HINCRBY', KEYS[2], pin, -1) <= 0 then redis.call('HDEL', KEYS[2], pin) end
return 1
"""

# Replace a resumable session whole (redis_sessions.py): a resume reading it meanwhile never
# finds it half written or gone.
# KEYS: 1 the session   ARGV: 1 TTL in ms, then field, value, field, value...
KEEP_SESSION = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# The records of one table's orders (the table index), for order.get by table_id.
# KEYS: 1 the table's order ids   ARGV: 1 record key prefix
TABLE_RECORDS = """
local records = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local rec = redis.call('HGET', ARGV[1] .. id, 'rec')
  if rec then records[#records + 1] = rec end
end
return records
"""

# The connections a dead broker held in one store: the terminals it held, each with role.
# KEYS: 1 connections per terminal|broker   ARGV: 1 broker id
DEAD_FIELDS = """
local found = {}
local fields = redis.call('HGETALL', KEYS[1])
local suffix = '|' .. ARGV[1]
for j = 1, #fields, 2 do
  local f = fields[j]
  if string.sub(f, -#suffix) == suffix then
    found[#found + 1] = string.sub(f, 1, #f - #suffix)
  end
end
return found
"""

# The store's epoch.   KEYS: 1 seqs   ARGV: 1 an epoch to make if there is none
EPOCH = _EMIT + """
return epoch_of(KEYS[1], ARGV[1])
"""

# A consistent snapshot of a store: every record, the online terminals and the channel's seq
# with its epoch.
# KEYS: 1 order ids, 2 online terminals, 3 seqs
# ARGV: 1 store channel, 2 record key prefix, 3 an epoch to make if there is none
SNAPSHOT_STORE = _EMIT + """
local records = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local rec = redis.call('HGET', ARGV[2] .. id, 'rec')
  if rec then records[#records + 1] = rec end
end
return {seq_of(KEYS[3], ARGV[1]), records, redis.call('HVALS', KEYS[2]),
        epoch_of(KEYS[3], ARGV[3])}
"""

# A subscriber of an order not seen yet is given a seq that the order's first event will
# follow; that seq field is written down as unclaimed, and goes (with its index entry) once
# it is older than ARGV[5] ms or past the ARGV[6] newest, unless its order came meanwhile.
# KEYS: 1 record, 2 seqs, 3 unclaimed seqs (order id -> when)
# ARGV: 1 order channel, 2 order id, 3 order channel prefix, 4 record key prefix,
#       5 unclaimed lifetime ms, 6 unclaimed bound, 7 an epoch to make if there is none
SNAPSHOT_ORDER = _EMIT + """
local rec = redis.call('HGET', KEYS[1], 'rec') or false
local seq = redis.call('HGET', KEYS[2], ARGV[1])
local now = now_ms()
if not seq then
  seq = seq_of(KEYS[2], ARGV[1])
  if not rec then redis.call('ZADD', KEYS[3], now, ARGV[2]) end
end
local left = redis.call('ZCARD', KEYS[3])
local oldest = redis.call('ZRANGE', KEYS[3], 0, 7, 'WITHSCORES')
for j = 1, #oldest, 2 do
  if tonumber(oldest[j + 1]) > now - tonumber(ARGV[5]) and left <= tonumber(ARGV[6]) then break end
  local id = oldest[j]
  if redis.call('EXISTS', ARGV[4] .. id) == 0 then
    redis.call('HDEL', KEYS[2], ARGV[3] .. id)
  end
  redis.call('ZREM', KEYS[3], id)
  left = left - 1
end
return {seq, rec, epoch_of(KEYS[2], ARGV[7])}
"""

# Connections counted for the limits across brokers (rules.connection_limit judges them):
# each broker writes its own count per store and per terminal (one hash field each, set to
# the broker's exact count, so a retried or re-sent call is harmless), and keeps its entry
# in the store's liveness set fresh; a broker whose entry is older than the lapse is dead
# (SIGKILL), and its fields are dropped as they are met.
_COUNT_HELPERS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function put(key, broker, n)
  if tonumber(n) > 0 then
    redis.call('HSET', key, broker, n)
  else
    redis.call('HDEL', key, broker)
  end
end
"""

# Set this broker's counts of a store and a terminal, and read the totals of live brokers.
# KEYS: 1 the store's connections per broker, 2 the terminal's, 3 the store's brokers by
#       last refresh (ms)
# ARGV: 1 broker id, 2 its connections of the store, 3 of the terminal, 4 lapse ms
# Returns {store total, terminal total, 1 if this broker's own entry had lapsed}
COUNT_CONNECTIONS = _COUNT_HELPERS + """
local broker, now = ARGV[1], now_ms()
local oldest = now - tonumber(ARGV[4])
local seen = redis.call('ZSCORE', KEYS[3], broker)
local lapsed = (not seen or tonumber(seen) < oldest) and 1 or 0
redis.call('ZADD', KEYS[3], now, broker)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. oldest)
local function live_total(key, n)
  put(key, broker, n)
  local sum = 0
  local fields = redis.call('HGETALL', key)
  for j = 1, #fields, 2 do
    if redis.call('ZSCORE', KEYS[3], fields[j]) then
      sum = sum + tonumber(fields[j + 1])
    else
      redis.call('HDEL', key, fields[j])
    end
  end
  return sum
end
return {live_total(KEYS[1], ARGV[2]), live_total(KEYS[2], ARGV[3]), lapsed}
"""

# Set every count of this broker in a store again (its entry had lapsed, or a call's reply
# was lost). KEYS: 1 the store's connections per broker, 2 its brokers by last refresh,
# 3.. terminals' connections per broker   ARGV: 1 broker id, 2 its connections of the
# store, 3.. of each terminal of KEYS 3..
RECOUNT_CONNECTIONS = _COUNT_HELPERS + """
local broker = ARGV[1]
redis.call('ZADD', KEYS[2], now_ms(), broker)
put(KEYS[1], broker, ARGV[2])
for j = 3, #KEYS do put(KEYS[j], broker, ARGV[j]) end
return 1
"""
