# A Sidekiq 6 app that reports its jobs to jobledger's seed endpoints, as in the README:
# the client middleware posts each job enqueued, the server middleware posts started, then
# complete (or failed, with the error). Nothing in it knows about recovery.
#
# Environment: REDIS_URL (Sidekiq's own), JOBLEDGER_URL (the supervisor), and for the tests
# SIDEKIQ_BEAT_PAUSE (seconds between Sidekiq's heartbeats; 5 by default).
require "json"
require "faraday"
require "sidekiq"
require "sidekiq/launcher"

if (pause = ENV["SIDEKIQ_BEAT_PAUSE"])
  Sidekiq::Launcher.send(:remove_const, :BEAT_PAUSE)
  Sidekiq::Launcher.const_set(:BEAT_PAUSE, Float(pause))
end

module Jobledger
  URL = ENV.fetch("JOBLEDGER_URL")

  def self.report(path, job, extra = {})
    form = {job_class: job["class"], arguments: job["args"].to_json, queue: job["queue"]}
    Faraday.post("#{URL}/api/v1/jobs#{path}", form.merge(extra))
  rescue Faraday::Error => e
    Sidekiq.logger.warn("jobledger: #{path} of #{job["jid"]} not reported: #{e.message}")
  end

  # Sidekiq.configure_client: every job pushed is recorded queued.
  class ClientMiddleware
    def call(_worker_class, job, _queue, _redis_pool)
      pushed = yield
      Jobledger.report("", job, job_id: job["jid"]) if pushed
      pushed
    end
  end

  # Sidekiq.configure_server: started before the job runs, complete or failed after.
  class ServerMiddleware
    FORWARDED = %w[jobledger_generation jobledger_republish].freeze

    def call(_worker, job, _queue)
      Jobledger.report("/#{job["jid"]}/started", job, job.slice(*FORWARDED))
      begin
        yield
      rescue => e
        retrying = job["retry"] && job["retry"] != 0
        Jobledger.report("/#{job["jid"]}/failed", job, error: "#{e.class}: #{e.message}",
          will_retry: retrying ? "true" : "false")
        raise
      end
      Jobledger.report("/#{job["jid"]}/complete", job)
    end
  end
end

Sidekiq.configure_client do |config|
  config.client_middleware { |chain| chain.add Jobledger::ClientMiddleware }
end

Sidekiq.configure_server do |config|
  config.client_middleware { |chain| chain.add Jobledger::ClientMiddleware }
  config.server_middleware { |chain| chain.add Jobledger::ServerMiddleware }
end

# The tests' job: notes each start and completion in Redis (jl:starts, jl:completes), stays
# in flight while jl:hold exists (up to 60 s), then fails if jl:fail:<jid> exists (set while
# the job is held: a test learns the jid only once the job may already run).
class TrackedJob
  include Sidekiq::Worker
  sidekiq_options retry: false

  def perform(number)
    note("jl:starts", number)
    deadline = Time.now + 60
    sleep 0.05 while Sidekiq.redis { |r| r.exists?("jl:hold") } && Time.now < deadline
    raise "told to fail" if Sidekiq.redis { |r| r.exists?("jl:fail:#{jid}") }
    note("jl:completes", number)
  end

  private

  def note(list, number)
    entry = {jid: jid, number: number, pid: Process.pid, at: Time.now.to_f}.to_json
    Sidekiq.redis { |r| r.rpush(list, entry) }
  end
end
