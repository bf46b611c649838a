-- The cluster's routing state: one script, one command per call.
--
-- kefu.cluster.routing runs this file with EVALSHA. ARGV[1] names the command, ARGV[2..6] are
-- the shared settings (key prefix, grace, queue bound, agent bound, drain bound) and the
-- command's own arguments follow from ARGV[7]. A call is atomic: Redis runs no other command
-- while it executes, so two nodes never see each other's half-done routing.
--
-- Every check that can refuse a call runs before the first write: Redis does not roll back a
-- script, so a refusal must leave nothing behind (kefu.routing: "an operation that raises has
-- changed nothing"). The reply is a JSON object: {"err": code, "msg": text} for a refusal, or
-- {"e": effects, "m": moved_from, "more": bool, "r": result}.
--
-- The rules are those of kefu/routing.py and the round-robin is kefu/_core/_router_py.py's,
-- line for line where it matters: the helpers below carry the same names (can_serve, pick,
-- drain, finish) so the two can be read side by side.
--
-- Keys: see the module docstring of kefu/cluster/routing.py (every key below P .. "...").

local CMD = ARGV[1]
local P = ARGV[2] .. "route:"
local GRACE_MS = tonumber(ARGV[3])
local MAX_QUEUE = tonumber(ARGV[4])
local MAX_AGENTS = tonumber(ARGV[5])
local DRAIN_LIMIT = tonumber(ARGV[6])
local A = 7 -- first argument of the command

local NULL = cjson.null
local K_AGENTS = P .. "agents"
local K_ELIG = P .. "elig"
local K_AVAIL = P .. "avail"
local K_GRACE = P .. "grace"
local K_QUEUE = P .. "queue"
local K_LANES = P .. "lanes"
local K_TICKET = P .. "ticket"
local K_AGENT_SEQ = P .. "agent_seq"
local K_ASSIGN_SEQ = P .. "assign_seq"
local K_COUNTERS = P .. "counters"
local K_WEIGHT = P .. "weight"   -- agent -> weight
local K_CURRENT = P .. "current" -- agent -> current weight (SWRR)
local BATCH = 1000 -- ids per HMGET/HSET: unpack() has a bounded stack

-- What the command returns, filled as it goes.
local out = {}      -- effects, in the order the node applies them
local moved = nil   -- lowest 0-based queue index whose conversation may have a new position
local more = false  -- the drain stopped at DRAIN_LIMIT with conversations still queued

local function refuse(code, msg)
  return { err = code, msg = msg }
end

local function call(...)
  return redis.call(...)
end

-- -- keys -----------------------------------------------------------------------------------

local function k_agent(id) return P .. "a:" .. id end
local function k_groups_of(id) return P .. "ag:" .. id end
local function k_conns(id) return P .. "ac:" .. id end
local function k_held(id) return P .. "ah:" .. id end
local function k_group(g) return P .. "g:" .. g end
local function k_node(n) return P .. "n:" .. n end
local function k_conv(hex) return P .. "c:" .. hex end
local function k_lane(lane) return P .. "l:" .. lane end

-- The eligible agents of a group, or of everyone for no group; scored by seq (order added).
local function k_elig(group)
  if group then return P .. "ge:" .. group end
  return K_ELIG
end

-- Ids and group names hold no control character (checked by the caller), so NUL separates
-- the two halves of a lane name and "" stands for "none" (names are never empty).
local function lane_of(group, exclude)
  return (group or "") .. "\0" .. (exclude or "")
end

local function opt(s)
  if s == nil or s == false or s == "" then return nil end
  return s
end

-- -- agents ---------------------------------------------------------------------------------

local function agent_exists(id)
  return call("EXISTS", k_agent(id)) == 1
end

-- Keep the sets "avail" (online, connected, enabled) and "elig"/"ge:<group>" (available with
-- a free slot) in step with the agent's fields. The flags av/el in the hash say which sets
-- hold the agent, so only a change of eligibility touches the group sets.
local function sync(id)
  local key = k_agent(id)
  local f = call("HMGET", key, "st", "cn", "d", "ld", "m", "c", "av", "el", "seq")
  local cap = tonumber(f[5])
  if f[6] then cap = math.min(cap, tonumber(f[6])) end
  local av = f[1] == "online" and tonumber(f[2]) > 0 and f[3] == "0"
  local el = av and tonumber(f[4]) < cap
  local seq = f[9]
  if av ~= (f[7] == "1") then
    if av then call("ZADD", K_AVAIL, seq, id) else call("ZREM", K_AVAIL, id) end
    call("HSET", key, "av", av and "1" or "0")
  end
  if el ~= (f[8] == "1") then
    local groups = call("SMEMBERS", k_groups_of(id))
    if el then
      call("ZADD", K_ELIG, seq, id)
      for _, g in ipairs(groups) do call("ZADD", k_elig(g), seq, id) end
    else
      call("ZREM", K_ELIG, id)
      for _, g in ipairs(groups) do call("ZREM", k_elig(g), id) end
    end
    call("HSET", key, "el", el and "1" or "0")
  end
end

local function connections(id)
  local total = 0
  for _, n in ipairs(call("HVALS", k_conns(id))) do total = total + tonumber(n) end
  call("HSET", k_agent(id), "cn", total)
  return total
end

local function begin_grace(id, now)
  local f = call("HMGET", k_agent(id), "cn", "gr")
  if tonumber(f[1]) == 0 and not f[2] then
    local deadline = now + GRACE_MS
    call("HSET", k_agent(id), "gr", deadline)
    call("ZADD", K_GRACE, deadline, id)
  end
end

local function end_grace(id)
  call("HDEL", k_agent(id), "gr")
  call("ZREM", K_GRACE, id)
end

-- -- round-robin (kefu/_core/_router_py.py: Router.pick) -------------------------------------

local function can_take(id, group)
  return call("ZSCORE", k_elig(group), id) ~= false
end

-- Nginx's smooth weighted round-robin over the eligible agents of the group, except `skip`
-- (which keeps its current weight, as an agent that is not a candidate does). The set is
-- sorted by seq, so keeping the first of equal current weights gives ties to the earliest.
-- Weights and current weights live in two hashes so that a pick over n agents costs a few
-- commands per BATCH of agents rather than two per agent (a pick is O(n) in any case).
local function swrr(group, skip)
  local ids = {}
  for _, id in ipairs(call("ZRANGE", k_elig(group), 0, -1)) do
    if id ~= skip then ids[#ids + 1] = id end
  end
  if #ids == 0 then return nil end
  local best, best_cw, total = nil, nil, 0
  for first = 1, #ids, BATCH do
    local last = math.min(first + BATCH - 1, #ids)
    local ws = call("HMGET", K_WEIGHT, unpack(ids, first, last))
    local cws = call("HMGET", K_CURRENT, unpack(ids, first, last))
    local update = {}
    for i = first, last do
      local w = tonumber(ws[i - first + 1])
      local cw = tonumber(cws[i - first + 1]) + w
      total = total + w
      update[#update + 1] = ids[i]
      update[#update + 1] = cw
      if best == nil or cw > best_cw then best, best_cw = ids[i], cw end
    end
    call("HSET", K_CURRENT, unpack(update))
  end
  call("HSET", K_CURRENT, best, best_cw - total)
  call("HINCRBY", k_agent(best), "ld", 1)
  sync(best)
  return best
end

-- kefu.routing.Routing._can_serve
local function can_serve(group, exclude)
  local n = call("ZCARD", k_elig(group))
  if n == 0 then return false end
  if n > 1 or not exclude then return true end
  return not can_take(exclude, group)
end

-- kefu.routing.Routing._pick
local function pick(group, exclude)
  if not exclude or not can_take(exclude, group) then return swrr(group, nil) end
  return swrr(group, exclude)
end

-- -- conversations and the queue ------------------------------------------------------------

local function conv_get(hex)
  local f = call("HMGET", k_conv(hex), "t", "s", "g", "a", "x")
  if not f[1] then return nil end
  return { t = tonumber(f[1]), s = f[2], g = opt(f[3]), a = opt(f[4]), x = opt(f[5]) }
end

local function note_moved(index)
  if moved == nil or index < moved then moved = index end
end

local function q_push(hex, ticket, group, exclude)
  call("ZADD", K_QUEUE, ticket, hex)
  local index = call("ZRANK", K_QUEUE, hex)
  if index + 1 < call("ZCARD", K_QUEUE) then note_moved(index + 1) end
  local lane = lane_of(group, exclude)
  call("ZADD", k_lane(lane), ticket, hex)
  call("SADD", K_LANES, lane)
end

local function q_discard(hex, group, exclude)
  local index = call("ZRANK", K_QUEUE, hex)
  if index == false then return end
  call("ZREM", K_QUEUE, hex)
  if index < call("ZCARD", K_QUEUE) then note_moved(index) end
  local lane = lane_of(group, exclude)
  call("ZREM", k_lane(lane), hex)
  if call("EXISTS", k_lane(lane)) == 0 then call("SREM", K_LANES, lane) end
end

local function assign(hex, id, rec)
  rec.a = id
  call("HSET", k_conv(hex), "a", id)
  call("HDEL", k_conv(hex), "x")
  call("ZADD", k_held(id), call("INCR", K_ASSIGN_SEQ), hex)
  call("HINCRBY", K_COUNTERS, "assigned_total", 1)
  out[#out + 1] = { "A", hex, id, rec.g or NULL }
end

local function free_slot(hex, id)
  if tonumber(call("HGET", k_agent(id), "ld")) <= 0 then
    error("agent " .. id .. " has no conversation to release")
  end
  call("HINCRBY", k_agent(id), "ld", -1)
  call("ZREM", k_held(id), hex)
  sync(id)
end

-- kefu.routing.Routing._drain: the oldest conversation among the lane heads that an eligible
-- agent can serve, until none can be served or DRAIN_LIMIT assignments were made.
local function drain()
  local done = 0
  while call("ZCARD", K_QUEUE) > 0 do
    if done >= DRAIN_LIMIT then
      more = true
      return
    end
    local best, best_t, best_rec = nil, nil, nil
    for _, lane in ipairs(call("SMEMBERS", K_LANES)) do
      local head = call("ZRANGE", k_lane(lane), 0, 0, "WITHSCORES")
      local t = tonumber(head[2])
      if best == nil or t < best_t then
        local rec = conv_get(head[1])
        if can_serve(rec.g, rec.x) then best, best_t, best_rec = head[1], t, rec end
      end
    end
    if best == nil then return end
    local id = pick(best_rec.g, best_rec.x)
    if id == nil then error("no agent picked for a servable lane") end
    q_discard(best, best_rec.g, best_rec.x)
    assign(best, id, best_rec)
    done = done + 1
  end
end

-- kefu.routing.Routing._finish, without the PositionChanged effects: a Queue for each
-- conversation this call put in line and that is still there.
local function finish(pushed)
  for _, hex in ipairs(pushed) do
    local index = call("ZRANK", K_QUEUE, hex)
    if index ~= false then
      out[#out + 1] = { "Q", hex, index + 1, call("HGET", k_conv(hex), "g") or NULL }
    end
  end
end

-- kefu.routing.Routing.requeue_agent
local function requeue(id)
  end_grace(id)
  local held = call("ZRANGE", k_held(id), 0, -1)
  for _, hex in ipairs(held) do
    local rec = conv_get(hex)
    free_slot(hex, id)
    call("HDEL", k_conv(hex), "a")
    out[#out + 1] = { "R", hex, id }
    q_push(hex, rec.t, rec.g, nil)
  end
  call("HINCRBY", K_COUNTERS, "requeued_total", #held)
  drain()
  finish(held)
end

-- -- commands -------------------------------------------------------------------------------

local C = {}

-- upsert id weight max_chats disabled(0|1) group...
function C.upsert()
  local id, weight, max_chats, disabled = ARGV[A], ARGV[A + 1], ARGV[A + 2], ARGV[A + 3]
  local groups = {}
  for i = A + 4, #ARGV do groups[ARGV[i]] = true end
  local key = k_agent(id)
  if not agent_exists(id) then
    if call("ZCARD", K_AGENTS) >= MAX_AGENTS then
      return refuse("too_many_agents", "the cluster holds " .. MAX_AGENTS .. " agents already")
    end
    local seq = call("INCR", K_AGENT_SEQ)
    call("HSET", key, "m", max_chats, "d", disabled, "st", "offline", "ld", 0, "seq", seq,
      "cn", 0, "av", "0", "el", "0")
    call("HSET", K_WEIGHT, id, weight)
    call("HSET", K_CURRENT, id, 0)
    call("ZADD", K_AGENTS, seq, id)
    for g in pairs(groups) do
      call("SADD", k_groups_of(id), g)
      call("ZADD", k_group(g), seq, id)
    end
  else
    if tonumber(call("HGET", K_WEIGHT, id)) ~= tonumber(weight) then
      call("HSET", K_WEIGHT, id, weight)
      call("HSET", K_CURRENT, id, 0)
    end
    call("HSET", key, "m", max_chats, "d", disabled)
    local f = call("HMGET", key, "seq", "el")
    local seq, el = f[1], f[2] == "1"
    for _, g in ipairs(call("SMEMBERS", k_groups_of(id))) do
      if groups[g] then
        groups[g] = nil -- kept
      else
        call("SREM", k_groups_of(id), g)
        call("ZREM", k_group(g), id)
        call("ZREM", k_elig(g), id)
      end
    end
    for g in pairs(groups) do
      call("SADD", k_groups_of(id), g)
      call("ZADD", k_group(g), seq, id)
      if el then call("ZADD", k_elig(g), seq, id) end
    end
  end
  sync(id)
  if disabled == "1" then requeue(id) else drain() end
end

-- state id node status connections chosen_max_chats|"" now_ms|""
function C.state()
  local id, node, status, conns = ARGV[A], ARGV[A + 1], ARGV[A + 2], tonumber(ARGV[A + 3])
  local chosen, now = opt(ARGV[A + 4]), opt(ARGV[A + 5])
  if not agent_exists(id) then return refuse("unknown_agent", "no agent " .. id) end
  if chosen then call("HSET", k_agent(id), "c", chosen) end
  call("HSET", k_agent(id), "st", status)
  if conns > 0 then
    call("HSET", k_conns(id), node, conns)
    call("SADD", k_node(node), id)
  else
    call("HDEL", k_conns(id), node)
    call("SREM", k_node(node), id)
  end
  if connections(id) > 0 then
    end_grace(id)
  elseif now then
    begin_grace(id, tonumber(now))
  end
  sync(id)
  drain()
end

-- disconnected id now_ms
function C.disconnected()
  local id, now = ARGV[A], tonumber(ARGV[A + 1])
  if not agent_exists(id) then return refuse("unknown_agent", "no agent " .. id) end
  begin_grace(id, now)
end

-- drop_node node now_ms|"": the node is gone with all its connections.
function C.drop_node()
  local node, now = ARGV[A], opt(ARGV[A + 1])
  local lost = {}
  for _, id in ipairs(call("SMEMBERS", k_node(node))) do
    call("HDEL", k_conns(id), node)
    if connections(id) == 0 then
      lost[#lost + 1] = id
      if now then begin_grace(id, tonumber(now)) end
    end
    sync(id)
  end
  call("DEL", k_node(node))
  table.sort(lost)
  return lost
end

-- expire now_ms
function C.expire()
  local now = tonumber(ARGV[A])
  local due = call("ZRANGEBYSCORE", K_GRACE, "-inf", now, "LIMIT", 0, DRAIN_LIMIT + 1)
  if #due > DRAIN_LIMIT then
    more = true
    due[#due] = nil
  end
  for _, id in ipairs(due) do requeue(id) end
end

-- route hex now_ms group|""
function C.route()
  local hex, now, group = ARGV[A], ARGV[A + 1], opt(ARGV[A + 2])
  if call("EXISTS", k_conv(hex)) == 1 then
    return refuse("already_routed", "conversation " .. hex .. " is already routed")
  end
  if group and call("EXISTS", k_group(group)) == 0 then
    return refuse("unknown_group", "no agent belongs to group " .. group)
  end
  -- Under the drain invariant a servable conversation is assigned in the drain below, so the
  -- queue's bound is only enforced on one that would really wait.
  if not can_serve(group, nil) and call("ZCARD", K_QUEUE) >= MAX_QUEUE then
    call("HINCRBY", K_COUNTERS, "queue_full_total", 1)
    return refuse("queue_full", "the waiting queue is full (" .. MAX_QUEUE .. " conversations)")
  end
  local ticket = call("INCR", K_TICKET)
  call("HSET", k_conv(hex), "t", ticket, "s", now)
  if group then call("HSET", k_conv(hex), "g", group) end
  q_push(hex, ticket, group, nil)
  drain()
  finish({ hex })
end

-- restore hex now_ms group|"" agent|""
-- kefu.routing.Routing.restore, for a conversation Redis lost (it restarted without its data):
-- one whose agent still exists and is enabled goes back to it, over capacity if need be, with
-- no effect (the node already shows it there) and the agent's grace begun if it is not
-- connected; any other goes in line, past the queue's bound if need be (it was waiting).
-- A group nobody belongs to any more is dropped.
function C.restore()
  local hex, now, group, id = ARGV[A], ARGV[A + 1], opt(ARGV[A + 2]), opt(ARGV[A + 3])
  if call("EXISTS", k_conv(hex)) == 1 then
    return refuse("already_routed", "conversation " .. hex .. " is already routed")
  end
  if group and call("EXISTS", k_group(group)) == 0 then group = nil end
  local ticket = call("INCR", K_TICKET)
  call("HSET", k_conv(hex), "t", ticket, "s", now)
  if group then call("HSET", k_conv(hex), "g", group) end
  if id and agent_exists(id) and call("HGET", k_agent(id), "d") == "0" then
    call("HINCRBY", k_agent(id), "ld", 1)
    sync(id)
    call("HSET", k_conv(hex), "a", id)
    call("ZADD", k_held(id), call("INCR", K_ASSIGN_SEQ), hex)
    begin_grace(id, tonumber(now))
    return
  end
  q_push(hex, ticket, group, nil)
  drain()
  finish({ hex })
end

-- release hex
function C.release()
  local hex = ARGV[A]
  local rec = conv_get(hex)
  if rec == nil then return end
  call("DEL", k_conv(hex))
  if rec.a == nil then
    q_discard(hex, rec.g, rec.x)
  else
    free_slot(hex, rec.a)
    drain()
  end
end

-- accept hex id
function C.accept()
  local hex, id = ARGV[A], ARGV[A + 1]
  local rec = conv_get(hex)
  if rec == nil or rec.a ~= nil then
    return refuse("not_queued", "conversation " .. hex .. " is not queued")
  end
  if not agent_exists(id) then return refuse("unknown_agent", "no agent " .. id) end
  if not can_take(id, nil) then
    return refuse("agent_unavailable", "agent " .. id .. " cannot take another conversation now")
  end
  call("HINCRBY", k_agent(id), "ld", 1)
  sync(id)
  q_discard(hex, rec.g, rec.x)
  assign(hex, id, rec)
  call("HINCRBY", K_COUNTERS, "accepted_total", 1)
end

-- transfer hex from to|"" to_group|"" force(0|1)
function C.transfer()
  local hex, from = ARGV[A], ARGV[A + 1]
  local to, to_group, force = opt(ARGV[A + 2]), opt(ARGV[A + 3]), ARGV[A + 4] == "1"
  local rec = conv_get(hex)
  if rec == nil or rec.a ~= from then
    return refuse("not_assigned", "conversation " .. hex .. " is not assigned to " .. from)
  end
  local pushed = {}
  if to then
    if not agent_exists(to) then return refuse("unknown_agent", "no agent " .. to) end
    if to == from then
      return refuse("agent_unavailable", "conversation " .. hex .. " is already with " .. to)
    end
    local f = call("HMGET", k_agent(to), "d", "cn")
    if f[1] == "1" or tonumber(f[2]) == 0 then
      return refuse("agent_unavailable", "agent " .. to .. " is not connected")
    end
    local over = not can_take(to, nil)
    if over and not force then
      return refuse("agent_unavailable", "agent " .. to .. " cannot take another conversation now")
    end
    call("HINCRBY", k_agent(to), "ld", 1)
    sync(to)
    if over then call("HINCRBY", K_COUNTERS, "forced_total", 1) end
    free_slot(hex, from)
    out[#out + 1] = { "U", hex, from }
    assign(hex, to, rec)
  else
    if call("EXISTS", k_group(to_group)) == 0 then
      return refuse("unknown_group", "no agent belongs to group " .. to_group)
    end
    -- No pick can happen when the queue would refuse: check the bound first when nobody
    -- other than the sender is eligible (pick changes nothing when it finds nobody).
    if not can_serve(to_group, from) and call("ZCARD", K_QUEUE) >= MAX_QUEUE then
      call("HINCRBY", K_COUNTERS, "queue_full_total", 1)
      return refuse("queue_full", "the waiting queue is full (" .. MAX_QUEUE .. " conversations)")
    end
    local picked = pick(to_group, from)
    if picked == nil then
      q_push(hex, rec.t, to_group, from)
      call("HSET", k_conv(hex), "x", from)
      pushed = { hex }
    end
    free_slot(hex, from)
    call("HDEL", k_conv(hex), "a")
    call("HSET", k_conv(hex), "g", to_group)
    rec.a, rec.g = nil, to_group
    out[#out + 1] = { "U", hex, from }
    if picked ~= nil then assign(hex, picked, rec) end
  end
  call("HINCRBY", K_COUNTERS, "transferred_total", 1)
  drain()
  finish(pushed)
end

-- requeue id
function C.requeue()
  local id = ARGV[A]
  if not agent_exists(id) then return refuse("unknown_agent", "no agent " .. id) end
  requeue(id)
end

-- remove id
function C.remove()
  local id = ARGV[A]
  if not agent_exists(id) then return refuse("unknown_agent", "no agent " .. id) end
  call("HSET", k_agent(id), "d", "1")
  sync(id) -- out of the drain below
  requeue(id)
  for _, g in ipairs(call("SMEMBERS", k_groups_of(id))) do
    call("ZREM", k_group(g), id)
    call("ZREM", k_elig(g), id)
  end
  for _, node in ipairs(call("HKEYS", k_conns(id))) do call("SREM", k_node(node), id) end
  call("DEL", k_agent(id), k_groups_of(id), k_conns(id), k_held(id))
  call("ZREM", K_AGENTS, id)
  call("ZREM", K_AVAIL, id)
  call("ZREM", K_ELIG, id)
  call("ZREM", K_GRACE, id)
  call("HDEL", K_WEIGHT, id)
  call("HDEL", K_CURRENT, id)
end

-- drain
function C.drain()
  drain()
end

local function queue_view()
  local rows = {}
  local q = call("ZRANGE", K_QUEUE, 0, -1, "WITHSCORES")
  for i = 1, #q, 2 do
    local rec = conv_get(q[i])
    rows[#rows + 1] = { q[i], rec.t, rec.s, rec.g or NULL, rec.x or NULL }
  end
  return rows
end

-- stats now_ms
function C.stats()
  local now = tonumber(ARGV[A])
  local capacity, load = 0, 0
  for _, id in ipairs(call("ZRANGE", K_AGENTS, 0, -1)) do
    local f = call("HMGET", k_agent(id), "ld", "m", "c", "av")
    load = load + tonumber(f[1])
    if f[4] == "1" then
      local cap = tonumber(f[2])
      if f[3] then cap = math.min(cap, tonumber(f[3])) end
      capacity = capacity + cap
    end
  end
  local oldest = 0
  local head = call("ZRANGE", K_QUEUE, 0, 0)
  if #head > 0 then oldest = math.max(0, now - tonumber(call("HGET", k_conv(head[1]), "s"))) end
  local r = {
    agents = call("ZCARD", K_AGENTS),
    agents_available = call("ZCARD", K_AVAIL),
    agents_in_grace = call("ZCARD", K_GRACE),
    capacity = capacity,
    load = load,
    queued = call("ZCARD", K_QUEUE),
    queue_max = MAX_QUEUE,
    queue_lanes = call("SCARD", K_LANES),
    queue_oldest_wait_ms = oldest,
  }
  local counters = call("HGETALL", K_COUNTERS)
  for _, name in ipairs({ "queue_full_total", "assigned_total", "accepted_total",
    "transferred_total", "requeued_total", "forced_total" }) do
    r[name] = 0
  end
  for i = 1, #counters, 2 do r[counters[i]] = tonumber(counters[i + 1]) end
  return r
end

-- snapshot: everything, for debugging (O(agents + routed conversations)).
function C.snapshot()
  local agents = {}
  for _, id in ipairs(call("ZRANGE", K_AGENTS, 0, -1)) do
    local f = call("HMGET", k_agent(id), "m", "c", "d", "st", "ld", "seq", "cn", "gr", "av", "el")
    agents[#agents + 1] = {
      id = id,
      weight = tonumber(call("HGET", K_WEIGHT, id)),
      current_weight = tonumber(call("HGET", K_CURRENT, id)),
      max_chats = tonumber(f[1]),
      chosen_max_chats = f[2] and tonumber(f[2]) or NULL,
      disabled = f[3] == "1",
      status = f[4],
      load = tonumber(f[5]),
      seq = tonumber(f[6]),
      connections = call("HGETALL", k_conns(id)),
      grace_deadline_ms = f[8] and tonumber(f[8]) or NULL,
      available = f[9] == "1",
      eligible = f[10] == "1",
      groups = call("SMEMBERS", k_groups_of(id)),
      held = call("ZRANGE", k_held(id), 0, -1),
    }
  end
  return { agents = agents, queue = queue_view(), lanes = call("SCARD", K_LANES) }
end

local command = C[CMD]
if command == nil then return redis.error_reply("unknown routing command " .. tostring(CMD)) end
local result = command()
if type(result) == "table" and result.err then return cjson.encode(result) end
return cjson.encode({ e = out, m = moved or NULL, more = more, r = result or NULL })
