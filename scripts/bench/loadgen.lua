-- wrk's side of the benchmark's load generator (scripts/bench/loadgen.py runs it; see its docstring).
--
--   wrk -t 1 -c 16 -d 20s --timeout 150s -s scripts/bench/loadgen.lua URL -- BODY_LIST
--
-- BODY_LIST names one request body file per line; every request POSTs the next of them (each thread
-- starts at its own), pre-formatted once in init() as wrk's SCRIPTING advises. The Content-Type and
-- the Authorization header come from the environment (LOADGEN_CONTENT_TYPE, LOADGEN_AUTHORIZATION),
-- not from the command line, so that the token never shows in a process listing. Answers outside
-- 2xx are counted per status, and the first one is kept; done() prints one "loadgen-result" block
-- of "name value" lines that scripts/bench/loadgen.py parses.

local threads = {}

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

function init(args)
   local headers = {["Content-Type"] = os.getenv("LOADGEN_CONTENT_TYPE") or "application/octet-stream"}
   local authorization = os.getenv("LOADGEN_AUTHORIZATION")
   if authorization and authorization ~= "" then
      headers["Authorization"] = authorization
   end
   prepared = {}
   local list = assert(io.open(args[1], "r"))
   for path in list:lines() do
      local file = assert(io.open(path, "rb"))
      prepared[#prepared + 1] = wrk.format("POST", nil, headers, file:read("*a"))
      file:close()
   end
   list:close()
   assert(#prepared > 0, "no request bodies in " .. args[1])
   next_body = (id or 0) % #prepared
   non2xx, statuses, first_error = 0, {}, ""
end

function request()
   next_body = next_body % #prepared + 1
   return prepared[next_body]
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      local key = tostring(status)
      statuses[key] = (statuses[key] or 0) + 1
      if first_error == "" then
         first_error = "HTTP " .. key .. ": " .. string.sub(body or "", 1, 200)
      end
   end
end

function done(summary, latency, requests)
   local non2xx, statuses, first_error = 0, {}, ""
   for _, thread in ipairs(threads) do
      non2xx = non2xx + (thread:get("non2xx") or 0)
      for status, count in pairs(thread:get("statuses") or {}) do
         statuses[status] = (statuses[status] or 0) + count
      end
      local first = thread:get("first_error") or ""
      if first_error == "" then
         first_error = first
      end
   end
   local out = {"loadgen-result",
                string.format("requests %d", summary.requests),
                string.format("duration_us %d", summary.duration),
                string.format("non2xx %d", non2xx)}
   for status, count in pairs(statuses) do
      out[#out + 1] = string.format("status_%s %d", status, count)
   end
   for _, kind in ipairs({"connect", "read", "write", "timeout"}) do
      out[#out + 1] = string.format("socket_%s %d", kind, summary.errors[kind])
   end
   for _, q in ipairs({50, 90, 99}) do
      out[#out + 1] = string.format("latency_p%d_us %d", q, latency:percentile(q))
   end
   out[#out + 1] = string.format("latency_mean_us %.1f", latency.mean)
   out[#out + 1] = string.format("latency_max_us %d", latency.max)
   out[#out + 1] = "first_error " .. (string.gsub(first_error, "%s+", " "))
   out[#out + 1] = "loadgen-end"
   io.write(table.concat(out, "\n") .. "\n")
end
