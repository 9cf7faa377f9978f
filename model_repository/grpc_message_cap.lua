-- flowact: the gRPC message cap of the gateway (flowact gateway; the chart's EnvoyExtensionPolicy).
-- Reads the gRPC length prefixes (1 flag byte, 4 bytes big-endian length) of the request body as it
-- streams through, without buffering it. Of a message announced above MAX only the prefix reaches the
-- replica, and nothing after it: the call stalls until the client gives up or the stream idle timeout
-- ends it. (Envoy's Lua filter cannot reset a stream whose headers went on, envoyproxy/envoy#12985 and
-- #39321, and Envoy has no per-message limit of its own; its body_size_limit counts a whole stream.)
-- The value after `local MAX =` is a placeholder, replaced by the cap in bytes when the config is rendered.
local MAX = MAX_BYTES
function envoy_on_request(handle)
  local need, prefix, cut = 0, "", false
  for chunk in handle:bodyChunks() do
    local n, pos = chunk:length(), 0
    if cut then
      chunk:setBytes("")
      pos = n
    end
    while pos < n do
      if need > 0 then
        local take = math.min(need, n - pos)
        need, pos = need - take, pos + take
      else
        local take = math.min(5 - #prefix, n - pos)
        prefix, pos = prefix .. chunk:getBytes(pos, take), pos + take
        if #prefix == 5 then
          local _, a, b, c, d = prefix:byte(1, 5)
          need = ((a * 256 + b) * 256 + c) * 256 + d
          if need > MAX then
            handle:logWarn("flowact gateway: a gRPC message of " .. need .. " bytes is over the cap of " .. MAX)
            chunk:setBytes(chunk:getBytes(0, pos))  -- up to its prefix; nothing after it goes upstream
            cut, pos = true, n
          end
          prefix = ""
        end
      end
    end
  end
end
