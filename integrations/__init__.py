"""flowact as the avatar of a voice agent: a Pipecat video service (`flowact.integrations.pipecat`, extra
`flowact[pipecat]`) and a LiveKit Agents avatar (`flowact.integrations.livekit`, extra `flowact[livekit]`).
Each imports its framework only when imported itself."""
